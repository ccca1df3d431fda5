"""Spread across training seeds (``esolm spread``): real DVC experiments in a tiny project, the
file's one writer and reader, and the report's table beside the run's own number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esolm.spread import SeedRow, Spread, read_spread, write_spread
from tests.test_report_ingest import PARAMS, project  # noqa: F401  (project: a fixture)

BIN = Path(sys.executable).parent


def _spread(**kw) -> Spread:
    rows = [SeedRow(0, "a", 10.0, 12.0), SeedRow(1, "a", 14.0, 13.0), SeedRow(2, "a", 12.0, None),
            SeedRow(0, "b", 30.0, 31.0)]
    return Spread(rows=rows, command="esolm spread --seeds 0 1 2", revision="abcdef1234567", **kw)


def test_summary_states_mean_sample_sd_and_range_per_variant():
    s = _spread().summary()
    assert s["a"]["n"] == 3 and s["a"]["mean"] == pytest.approx(12.0) and s["a"]["sd"] == pytest.approx(2.0)
    assert (s["a"]["min"], s["a"]["max"]) == (10.0, 14.0) and s["a"]["values"] == {0: 10.0, 1: 14.0, 2: 12.0}
    assert s["b"]["sd"] is None  # one seed: no spread to state
    assert _spread().summary("nelbo_ppl")["a"]["n"] == 2  # a missing number is left out, not a zero


def test_the_file_round_trips_and_a_damaged_one_names_itself(tmp_path):
    path = tmp_path / "seeds.json"
    assert read_spread(path) is None
    write_spread(_spread(machine="2 CPU cores"), path)
    back = read_spread(path)
    assert back == _spread(machine="2 CPU cores") and back.seeds() == [0, 1, 2]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="seeds.json is not JSON.*esolm spread"):
        read_spread(path)
    path.write_text(json.dumps({"rows": [{"seed": 0}]}))
    with pytest.raises(ValueError, match="seeds.json: a row"):
        read_spread(path)


STAGE = """\
import json, pathlib, sys, yaml
p = yaml.safe_load(open("params.yaml"))
name = sys.argv[1]
out = pathlib.Path("reports/metrics") / name
out.mkdir(parents=True, exist_ok=True)
base = {"a": 10.0, "b": 30.0}[name]
(out / "likelihood.json").write_text(json.dumps({"exact_ppl": base + p["train"]["seed"],
                                                 "nelbo_ppl": base + 2 * p["train"]["seed"]}))
"""
DVC_YAML = """\
stages:
  evaluate:
    foreach: [a, b]
    do:
      cmd: python stage.py ${item}
      deps: [stage.py]
      params: [train.seed]
      metrics:
        - reports/metrics/${item}/likelihood.json:
            cache: false
"""


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    """A git + DVC project whose evaluate stage writes a likelihood.json that depends on train.seed."""
    repo = tmp_path / "p"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("train:\n  seed: 0\nvariants:\n  a: {}\n  b: {}\n")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@t")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@t")
    _git(repo, "init", "-q")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=repo, check=True)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    return repo


def test_measure_runs_one_experiment_per_seed_reuses_them_and_leaves_the_workspace(dvc_project):
    from esolm.spread import experiment_commits, measure

    repo = dvc_project
    params = {"train": {"seed": 0}, "variants": {"a": {}, "b": {}}}
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", "dvc.lock", "reports/metrics/a/likelihood.json")}
    spread = measure(params, [0, 3], repo, progress=False)
    got = {(r.seed, r.variant): (r.exact_ppl, r.nelbo_ppl) for r in spread.rows}
    assert got == {(0, "a"): (10.0, 10.0), (0, "b"): (30.0, 30.0), (3, "a"): (13.0, 16.0), (3, "b"): (33.0, 36.0)}
    assert {p: (repo / p).read_bytes() for p in before} == before  # the workspace is not touched
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert spread.revision == head and not spread.notes
    made = experiment_commits(repo, head)
    assert len(made) == 2 and {r.experiment for r in spread.rows} == set(made)
    again = measure(params, [3, 0], repo, progress=False)  # reused by name: no new experiment
    assert experiment_commits(repo, head) == made
    assert {(r.seed, r.variant): r.exact_ppl for r in again.rows} == {k: v[0] for k, v in got.items()}


def test_measure_refuses_uncommitted_code_or_params_and_bad_seeds(dvc_project):
    from esolm.spread import measure

    params = {"train": {"seed": 0}, "variants": {"a": {}}}
    with pytest.raises(ValueError, match=r"seeds=\[1, 1\]: give distinct seeds"):
        measure(params, [1, 1], dvc_project, progress=False)
    (dvc_project / "params.yaml").write_text("train:\n  seed: 5\nvariants:\n  a: {}\n")
    with pytest.raises(ValueError, match="uncommitted changes to params.yaml.*commit them"):
        measure(params, [1], dvc_project, progress=False)


def test_the_report_shows_the_spread_beside_the_run_and_says_where_it_was_measured(project):  # noqa: F811
    from esolm.report import write_report
    from esolm.spread import seed_free_hash
    from esolm.store import ingest, query

    params = {**PARAMS, "train": {"seed": 0, "lr": 0.001}}
    rows = [SeedRow(s, "eso", 20.0 + 4 * s, 22.0 + s) for s in (0, 1, 2)]
    write_spread(Spread(rows=rows, command="esolm spread --seeds 0 1 2", revision="0123456789abcdef",
                        params_hash=seed_free_hash({**params, "train": {"seed": 7, "lr": 0.001}}),
                        finished="2026-12-04T23:50:00Z", machine="2 CPU cores"), project / "reports" / "seeds.json")
    db = project / "reports" / "results.duckdb"
    counts = ingest(params, project / "runs", project / "reports", db, rid="r")
    assert counts["seed_runs"] == 3
    _, stored = query("SELECT seed, exact_ppl, same_params FROM seed_runs WHERE run_id = 'r' ORDER BY seed", db)
    assert stored == [(0, 20.0, True), (1, 24.0, True), (2, 28.0, True)]
    write_report(db, "r", project / "reports")
    md = (project / "reports" / "report.md").read_text()
    assert "## Across training seeds" in md and "`esolm spread --seeds 0 1 2` at revision `0123456789`" in md
    assert "| eso | 25 | 0, 1, 2 | 24 ± 4 | 20 - 28 | 23 ± 1 |" in md  # this run's 25 beside the seeds'
    assert "with this run's params" in md
    html = (project / "reports" / "index.html").read_text()
    assert "Across training seeds" in html and "24 ± 4" in html
    assert "<code>esolm spread --seeds 0 1 2</code> at revision <code>0123456789</code>" in html
    # another study's spread is labelled as such, never as this run's
    other = {**params, "train": {"seed": 0, "lr": 0.5}}
    ingest(other, project / "runs", project / "reports", db, rid="r2")
    write_report(db, "r2", project / "reports")
    assert "with other params than this run's" in (project / "reports" / "report.md").read_text()


def test_without_a_spread_file_the_report_has_no_seed_table(project):  # noqa: F811
    from esolm.report import write_report
    from esolm.store import ingest

    db = project / "reports" / "results.duckdb"
    assert ingest(PARAMS, project / "runs", project / "reports", db, rid="r")["seed_runs"] == 0
    write_report(db, "r", project / "reports")
    assert "Across training seeds" not in (project / "reports" / "report.md").read_text()
