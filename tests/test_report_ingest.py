"""The report reads the results database only: what it used to read from runs/ and
reports/search/ beside DuckDB is ingested (old databases upgrade), and its code is the report's
and the store's, not the model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FRONT = [{"variant": "eso", "trial": 3, "state": "COMPLETE", "feasible": True, "gen_ppl": 40.0, "seconds": 0.01,
          "nfe": 4, "entropy": 5.0, "params": {"steps": 4}},
         {"variant": "eso", "trial": 1, "state": "COMPLETE", "feasible": True, "gen_ppl": 30.0, "seconds": 0.04,
          "nfe": 16, "entropy": 5.1, "params": {"steps": 16}}]
DEFAULT = [{"gen_ppl": 45.0, "seconds": 0.02, "nfe": 8, "entropy": 5.0, "steps": 8, "feasible": True},
           {"gen_ppl": 35.0, "seconds": 0.05, "nfe": 16, "entropy": 5.2, "steps": 16, "feasible": True}]


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _variant(runs: Path, name: str, family: str, judge: str, **summary) -> None:
    """The files of one trained, evaluated and sampled variant."""
    _write(runs / name / "train.json", {"family": family, "steps": 2, "tokens": 64, "final_train_loss": 3.0,
                                        "final_valid_loss": 3.1, "wall_s": 1.0, "tokens_per_s": 64.0, **summary})
    _write(runs / name / "likelihood.json", {"variant": name, "family": family, "alpha_0": 0.5,
                                             "test": {"exact_l2r_ppl": 25.0, "nelbo_ppl": 27.0}})
    _write(runs / name / "generation.json", {
        "variant": name, "kv_cache": True, "family": family, "nfe": 8, "seconds": 0.1, "seconds_per_sample": 0.05,
        "tokens_per_s": 320.0,
        "gen_ppl": 50.0, "entropy": 5.0, "judge": judge, "num_samples": 2, "schedule": {"steps": 8}})
    _write(runs / name / "curve.json", {"variant": name, "family": family, "alpha_0": 0.5, "judge": judge,
                                        "num_samples": 2, "top_p": 1.0, "points": [
        {"steps": t, "nfe": t, "seconds_per_sample": 0.01 * t, "gen_ppl": 80.0 / t, "entropy": 5.0} for t in (4, 8)]})
    (runs / name / "samples.jsonl").write_text(json.dumps(
        {"index": 0, "text": f"a sample of {name}", "entropy": 5.0, "judge_nll": 3.9}) + "\n")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """runs/ (two contestants, one judged by the trained judge, one by an outside judge; the
    judge's own likelihood) and reports/search/ (trials and the Pareto front) of one run."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)  # nothing may be read from the working directory either
    runs = tmp_path / "runs"
    _variant(runs, "eso", "eso_b", "judge", objective="low_var", init="Normal(0, 0.02) weights, zero biases",
             mask_warmup={"steps": 200, "start": 0.3})
    _variant(runs, "mdlm", "mdlm", "gpt2")  # a train.json that recorded neither objective nor init
    _write(runs / "judge" / "likelihood.json", {"variant": "judge", "family": "ar", "alpha_0": 0.0,
                                               "test": {"exact_l2r_ppl": 12.34}, "valid": {"exact_l2r_ppl": 13.0}})
    search = tmp_path / "reports" / "search"
    trials = [*FRONT, {**FRONT[0], "trial": 2, "feasible": False, "gen_ppl": 60.0, "seconds": 0.02}]
    search.mkdir(parents=True)
    pd.DataFrame([{**t, "params": json.dumps(t["params"])} for t in trials]).to_parquet(search / "trials.parquet")
    _write(search / "pareto.json", {"variant": "eso", "entropy_floor": 4.0, "front": FRONT,
                                    "comparison": {"default": DEFAULT}})
    return tmp_path


PARAMS = {"variants": {"eso": {}, "mdlm": {}}, "judge": {"name": "judge"}, "data": {"out_dir": "none"}}
RECIPE = ("Training: init Normal(0, 0.02) weights, zero biases / unrecorded; objective low_var (eso); "
          "nelbo (mdlm); masking warm-up: the largest diffusion time rose from 0.3 to 1 over the first 200 "
          "steps (eso). Validation and every likelihood here draw t over [eps, 1].")
JUDGED = ("Generative perplexity is judged by gpt2, judge (an AR model of its own stage, never a contestant; "
          "its test perplexity 12.3).")


def test_ingest_keeps_what_the_report_read_beside_the_database(project):
    from esolm.store import ingest, query

    db = project / "reports" / "results.duckdb"
    counts = ingest(PARAMS, project / "runs", project / "reports", db, rid="r")
    assert counts["judges"] == 2 and counts["search_points"] == 4 and counts["search_trials"] == 3
    _, rows = query("SELECT variant, init, objective, mask_warmup_start, mask_warmup_steps FROM variants "
                    "ORDER BY variant", db)
    assert rows == [("eso", "Normal(0, 0.02) weights, zero biases", "low_var", 0.3, 200),
                    ("mdlm", None, "nelbo", None, None)]
    _, rows = query("SELECT judge, split, metric, value FROM judges ORDER BY split", db)
    assert rows == [("judge", "test", "exact_l2r_ppl", 12.34), ("judge", "valid", "exact_l2r_ppl", 13.0)]
    _, rows = query("SELECT variant, kind, point, trial, steps, seconds, gen_ppl FROM search_points "
                    "ORDER BY kind DESC, point", db)
    assert rows == [("eso", "front", 0, 3, None, 0.01, 40.0), ("eso", "front", 1, 1, None, 0.04, 30.0),
                    ("eso", "default", 0, None, 8, 0.02, 45.0), ("eso", "default", 1, None, 16, 0.05, 35.0)]
    assert ingest(PARAMS, project / "runs", project / "reports", db, rid="r") == counts  # replaced, not added


def test_the_report_renders_from_the_database_alone(project, monkeypatch):
    """After ingest, runs/ and reports/search/ are deleted: the recipe and judge lines, the
    searched front on the Pareto figure and the search figure come from DuckDB."""
    from esolm import report_figures
    from esolm.report import judge_line, recipe_line, write_report
    from esolm.store import ingest

    db = project / "results.duckdb"
    ingest(PARAMS, project / "runs", project / "reports", db, rid="r")
    shutil.rmtree(project / "runs")
    shutil.rmtree(project / "reports" / "search")
    assert recipe_line(db, "r") == RECIPE and judge_line(db, "r") == JUDGED
    figs, real = {}, report_figures._save

    def save(plt, fig, path: Path) -> bool:  # keep each figure to look at, and write it
        figs[path.name] = fig
        return real(plt, fig, path)

    monkeypatch.setattr(report_figures, "_save", save)
    out = write_report(db, "r", project / "out")
    md = (project / "out" / "report.md").read_text()
    timing = ("s/sample: one timed generation of 2 samples per variant, not a benchmark (the speed table's "
              "medians over repeats are); the machine's load was not recorded.")  # older generation.json
    assert f"{JUDGED} {timing} {RECIPE}" in md and "a sample of eso" in md
    assert {Path(f).name for f in out["figures"]} >= {"pareto.png", "search_pareto.png", "speed_quality.png"}
    assert all((project / "out" / "figures" / name).exists() for name in ("pareto.png", "search_pareto.png"))
    lines = {line.get_label(): line for ax in figs["pareto.png"].axes for line in ax.get_lines()}
    front = lines["searched schedule (front)"]
    assert list(front.get_xdata()) == [0.01, 0.04] and list(front.get_ydata()) == [40.0, 30.0]
    (ax,) = figs["search_pareto.png"].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"Pareto front": ([0.01, 0.04], [40.0, 30.0]),
                     "default schedule (T grid)": ([0.02, 0.05], [45.0, 35.0])}
    assert len(ax.collections[0].get_offsets()) == 3  # every trial, the infeasible one too


def test_an_old_database_upgrades_and_keeps_its_rows(tmp_path):
    """A database made before these columns and tables existed gains them on the next write
    connection (NULL in old rows); the report then reads it."""
    import duckdb

    from esolm.report import judge_line, recipe_line
    from esolm.store import connect, query

    db = tmp_path / "results.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE variants (run_id VARCHAR, variant VARCHAR, family VARCHAR, alpha_0 DOUBLE, "
                "steps BIGINT, tokens BIGINT, final_train_loss DOUBLE, final_valid_loss DOUBLE, wall_s DOUBLE, "
                "tokens_per_s DOUBLE, objective VARCHAR, PRIMARY KEY (run_id, variant))")
    con.execute("INSERT INTO variants (run_id, variant, family, objective) VALUES ('old', 'ar', 'ar', 'nelbo')")
    con.close()
    connect(db).close()
    _, cols = query("SELECT table_name, column_name FROM duckdb_columns() WHERE table_name IN "
                    "('variants', 'judges', 'search_points')", db)
    assert {("variants", c) for c in ("init", "mask_warmup_start", "mask_warmup_steps")} <= set(cols)
    assert {t for t, _ in cols} == {"variants", "judges", "search_points"}
    _, rows = query("SELECT variant, objective, init, mask_warmup_steps FROM variants", db)
    assert rows == [("ar", "nelbo", None, None)]
    assert recipe_line(db, "old").startswith("Training: init unrecorded; objective nelbo (ar); masking warm-up: none.")
    assert judge_line(db, "old") == ""


def test_the_report_runs_no_model_or_sampling_code():
    """The report stage reruns on the report's and the store's code, not on the model's."""
    import subprocess
    import sys

    import yaml

    from esolm.codedeps import stage_code

    heavy = ("esolm/model/", "esolm/sampling/", "esolm/training.py", "esolm/objectives.py", "esolm/bench.py")
    code = stage_code("report")
    assert "esolm/report.py" in code and "esolm/store.py" in code
    assert not [f for f in code if f.startswith(heavy)], code
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["deps"]
    assert not [d for d in deps if (d + "/").startswith(heavy) or d.startswith(heavy)], deps
    probe = "import sys, esolm.cli, esolm.report; print(' '.join(m for m in sys.modules if m.startswith('esolm')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = out.stdout.split()  # what importing the verb's modules runs, beside the static follower
    assert "esolm.report_figures" in loaded and not [m for m in loaded if m.startswith(
        ("esolm.model", "esolm.sampling", "esolm.training", "esolm.objectives", "esolm.bench"))], loaded


def test_the_report_says_how_loaded_the_machine_was_while_sampling(project):
    from esolm.report_results import timing_line
    from esolm.results import GenerationResult
    from esolm.store import ingest

    for name, load in (("eso", 1.2), ("mdlm", 3.46)):
        g = GenerationResult.read(project / "runs" / name)
        g.load_avg, g.cpus = load, 2
        g.write(project / "runs" / name)
    db = project / "reports" / "results.duckdb"
    ingest(PARAMS, project / "runs", project / "reports", db, rid="r")
    assert timing_line(db, "r").endswith("the machine's 1-minute load average after sampling was 1.2-3.5 on 2 "
                                         "cores: above 2 cores, other processes shared the machine, so these "
                                         "times are slower than an idle machine's.")
    g.load_avg = 0.8
    g.write(project / "runs" / "mdlm")
    ingest(PARAMS, project / "runs", project / "reports", db, rid="r")
    assert timing_line(db, "r").endswith("was 0.8-1.2 on 2 cores.")
