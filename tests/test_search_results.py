"""The search's typed results: to_json/from_json round trips, one writer and one reader per file,
best.json is the chosen trial's settings, reading best.json stays lean, small pieces."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from esolm.config import ScheduleSettings
from esolm.search import (
    BestSchedule,
    ParetoFront,
    SearchConfig,
    TrialRow,
    best_schedule,
    choose,
    objective_for,
    open_study,
    pareto,
    read_best,
    read_front,
    read_trials,
    run_study,
    study_trials,
    trial_rows,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "esolm" / "search"
FLOOR = 1.7


def toy_evaluate(params: dict) -> dict:
    """A deterministic stand-in for sampling and judging: more steps, better and slower; a low
    top_p lowers the entropy below FLOOR (infeasible)."""
    nfe = params.get("steps", 2 * params.get("subcontexts", 4))
    alpha_0, top_p = params.get("alpha_0", 0.5), params["top_p"]
    return {"gen_ppl": 10.0 + 100.0 / nfe + 5.0 * (1.0 - top_p) + alpha_0,
            "seconds": 1e-3 * nfe * (1.0 + alpha_0), "nfe": nfe, "entropy": 2.0 * top_p}


@pytest.fixture
def sc(tmp_path):
    return SearchConfig(n_trials=10, out_dir=str(tmp_path / "search"), space={"steps": [2, 32],
                        "alpha_0": [0.0, 1.0], "order": ["random", "block"], "top_p": [0.8, 1.0]})


@pytest.fixture
def study(sc):
    study = open_study(sc, "results")
    run_study(study, objective_for(toy_evaluate, sc.space, "eso_b", FLOOR), sc.n_trials)
    return study


ROW = TrialRow(variant="v", trial=3, state="COMPLETE", feasible=True, gen_ppl=12.5, seconds=0.25, nfe=8,
               entropy=1.9, params={"alpha_0": 0.3, "order": "block", "subcontexts": 4, "shuffle": True})
FAILED = TrialRow(variant="v", trial=4, state="FAIL", feasible=False, gen_ppl=None, seconds=None, nfe=None,
                  entropy=None, params={"steps": 3})


def test_each_result_round_trips_through_json():
    for row in (ROW, FAILED):
        assert TrialRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    front = ParetoFront(variant="v", entropy_floor=FLOOR, front=[ROW],
                        comparison={"default": [], "reference_point": [1.0, 2.0]})
    assert ParetoFront.from_json(json.loads(json.dumps(front.to_json()))) == front
    for best in (BestSchedule.of("v", ROW, 0.5), BestSchedule.of("v", None, 0.0)):
        assert BestSchedule.from_json(json.loads(json.dumps(best.to_json()))) == best
    assert BestSchedule.of("v", ROW, 0.5).schedule == ScheduleSettings(**ROW.params)


def test_a_bad_result_file_names_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"unknown keys \['gen_pll'\].*esolm search"):
        TrialRow.from_json({**ROW.to_json(), "gen_pll": 1.0})
    with pytest.raises(ValueError, match=r"missing keys \['params'\]"):
        TrialRow.from_json({k: v for k, v in ROW.to_json().items() if k != "params"})
    with pytest.raises(ValueError, match="stepz; did you mean 'steps'"):
        BestSchedule.from_json({"schedule": {"stepz": 8}})
    assert BestSchedule.from_json({"schedule": {"steps": 8}}).schedule == ScheduleSettings(steps=8)  # hand-written
    with pytest.raises(ValueError, match="holds no feasible schedule"):
        BestSchedule.of("v", None, 0.0).settings()
    with pytest.raises(ValueError, match="no search objectives"):
        FAILED.objectives()


def test_each_file_reads_back_what_was_written(sc, study, tmp_path):
    rows = study_trials(study, sc.variant)
    assert [r.to_json() for r in rows] == trial_rows(study, sc.variant)
    out = write_outputs(sc, [*rows, replace(FAILED, trial=len(rows))], {"default": []}, FLOOR)
    assert read_trials(sc.out_dir) == [*rows, replace(FAILED, trial=len(rows))]  # None, ints, params kept
    front = read_front(sc.out_dir)
    assert front.front == pareto([r for r in rows if r.feasible], TrialRow.objectives) and front.front
    assert [p.to_json() for p in front.front] == out["front"]
    assert (front.variant, front.entropy_floor, front.comparison) == (sc.variant, FLOOR, {"default": []})
    # typed rows and their JSON form write the same bytes
    again = replace(sc, out_dir=str(tmp_path / "again"))
    write_outputs(again, [r.to_json() for r in rows] + [replace(FAILED, trial=len(rows)).to_json()],
                  {"default": []}, FLOOR)
    for name in ("trials.parquet", "pareto.json", "best.json"):
        assert (Path(again.out_dir) / name).read_bytes() == (Path(sc.out_dir) / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="run the schedule search first"):
        read_best(tmp_path / "nowhere")


@pytest.mark.parametrize("budget", [0.0, 0.012])
def test_best_json_is_exactly_the_chosen_trials_settings(sc, study, budget):
    """Read the chosen trial back from the study itself (its values, constraint and suggested
    parameters, not through the rows) and compare it with best.json."""
    sc = replace(sc, time_budget=budget)
    write_outputs(sc, trial_rows(study, sc.variant), {}, FLOOR)
    best = read_best(sc.out_dir)

    feasible = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["constraint"][0] <= 0]
    points = [{"gen_ppl": t.values[0], "seconds": t.values[1], "trial": t} for t in feasible]
    chosen = choose(pareto(points), budget)["trial"]
    assert (best.gen_ppl, best.seconds) == tuple(chosen.values)
    alike = [t for t in study.trials if tuple(t.values or ()) == tuple(chosen.values)]  # ties: the same schedule
    assert all(ScheduleSettings.from_dict(t.params) == best.schedule for t in alike)
    assert best.schedule == ScheduleSettings.from_dict(chosen.params) == ScheduleSettings.from_dict(
        chosen.user_attrs["schedule"])
    assert best_schedule(sc.out_dir) == best.schedule
    stored = json.loads((Path(sc.out_dir) / "best.json").read_text())
    unused = BestSchedule.UNUSED[best.schedule.order]  # settings the chosen order never reads
    assert stored == {"variant": sc.variant, "schedule": {k: v for k, v in best.schedule.to_dict(run=False).items()
                                                          if k not in unused},
                      "gen_ppl": chosen.values[0], "seconds": chosen.values[1], "time_budget": budget,
                      "trial": chosen.number, "searched": chosen.params}
    if budget:
        assert best.seconds <= budget


def test_reading_best_json_imports_neither_optuna_nor_pandas(tmp_path):
    """``esolm sample`` with ``sample.schedule: best`` reads best.json on a lean install."""
    (tmp_path / "best.json").write_text(json.dumps(BestSchedule.of("v", ROW, 0.0).to_json()))
    code = ("import sys; from esolm.search import best_schedule; s = best_schedule(sys.argv[1]); "
            "heavy = sorted({'optuna', 'pandas', 'matplotlib', 'sqlalchemy'} & set(sys.modules)); "
            "print(s.order, heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True).stdout
    assert out.strip() == "block []"


def test_the_package_re_exports_what_it_declares():
    import esolm.search as search

    assert all(getattr(search, name) is not None for name in search.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        search.nope  # noqa: B018


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_small_modules_and_small_functions(path):
    """Modules of at most 350 lines, functions of at most 50 (the house's small pieces)."""
    text = path.read_text()
    assert len(text.splitlines()) <= 350, f"{path.name} has {len(text.splitlines())} lines"
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(ast.parse(text)) if f.end_lineno - f.lineno >= 50}
    assert not long, f"{path.name}: functions over 50 lines: {long}"


def test_the_front_helpers_take_typed_rows_and_dicts_alike():
    points = enumerate([(10, 3), (20, 1), (25, 2), (15, 2)])
    rows = [replace(ROW, trial=i, gen_ppl=g, seconds=s) for i, (g, s) in points]
    dicts = [r.to_json() for r in rows]
    front = pareto(rows, TrialRow.objectives)
    assert [r.to_json() for r in front] == pareto(dicts)
    assert choose(front, 0.0, TrialRow.objectives).trial == choose(pareto(dicts), 0.0)["trial"]
    assert math.isclose(choose(pareto(dicts), 2.5)["gen_ppl"], 15)
