"""The schedule search on a tiny model: trials, resume, constraint, Pareto front, failures."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from esolm import generate
from esolm.config import ScheduleSettings
from esolm.search import (
    SearchConfig,
    choose,
    hypervolume,
    objective_for,
    open_study,
    pareto,
    run_study,
    trial_rows,
    write_outputs,
)
from tests.conftest import sharp_model


def fake_evaluator(model, fail_when=None):
    """Real sampling (time, NFE, entropy) and a cheap deterministic stand-in for the judge."""
    from esolm.judge import unigram_entropy

    def evaluate(params: dict) -> dict:
        if fail_when is not None and fail_when(params):
            raise RuntimeError("simulated failure")
        g = generate(model, ScheduleSettings(seed=0, **params), num_samples=4)
        ent = sum(unigram_entropy(r) for r in g.tokens.tolist()) / 4
        return {"gen_ppl": 10.0 + 100.0 / g.nfe, "seconds": g.seconds / 4, "nfe": g.nfe,
                "entropy": ent}

    return evaluate


@pytest.fixture
def sc(tmp_path):
    return SearchConfig(n_trials=3, out_dir=str(tmp_path / "search"), space={"steps": [2, 16],
                        "alpha_0": [0.0, 1.0], "order": ["random", "block"], "top_p": [0.8, 1.0]})


def test_three_trials_then_resume_up_to_the_new_total(sc):
    model = sharp_model("eso_b", alpha_0=0.5)
    objective = objective_for(fake_evaluator(model), sc.space, "eso_b", floor=0.5)
    study = open_study(sc, "t")
    assert run_study(study, objective, 3) == 3
    numbers = [t.number for t in study.trials]
    again = open_study(sc, "t")  # a new process would reopen the SQLite study like this
    assert run_study(again, objective, 3) == 0
    assert run_study(again, objective, 5) == 2
    assert [t.number for t in again.trials][:3] == numbers and len(again.trials) == 5


def test_feasible_trials_respect_the_entropy_floor_and_the_front_is_non_dominated(sc):
    model = sharp_model("eso_b", alpha_0=0.5)
    floor = 1.2
    study = open_study(replace(sc, n_trials=6), "c")
    run_study(study, objective_for(fake_evaluator(model), sc.space, "eso_b", floor), 6)
    rows = trial_rows(study, sc.variant)
    assert all(r["entropy"] >= floor for r in rows if r["feasible"])
    out = write_outputs(sc, rows, {}, floor)
    sc_path = Path(sc.out_dir)
    front = json.loads((sc_path / "pareto.json").read_text())["front"]
    for p in front:
        assert p["feasible"]
        assert not any(q["gen_ppl"] <= p["gen_ppl"] and q["seconds"] <= p["seconds"]
                       and (q["gen_ppl"] < p["gen_ppl"] or q["seconds"] < p["seconds"]) for q in front)
    assert (sc_path / "trials.parquet").exists() and (sc_path / "pareto.png").exists()
    assert out["trials"] == 6


def test_a_trial_that_raises_is_recorded_as_failed_and_the_study_goes_on(sc):
    model = sharp_model("eso_b", alpha_0=0.5)
    calls = {"n": 0}

    def fail_first(params):
        calls["n"] += 1
        return calls["n"] == 1

    study = open_study(replace(sc, n_trials=3), "f")
    run_study(study, objective_for(fake_evaluator(model, fail_first), sc.space, "eso_b", 0.0), 3)
    states = [t.state.name for t in study.trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2


def test_pareto_hypervolume_and_choice():
    pts = [{"gen_ppl": 10, "seconds": 3}, {"gen_ppl": 20, "seconds": 1}, {"gen_ppl": 25, "seconds": 2},
           {"gen_ppl": 15, "seconds": 2}]
    front = pareto(pts)
    assert front == [{"gen_ppl": 20, "seconds": 1}, {"gen_ppl": 15, "seconds": 2}, {"gen_ppl": 10, "seconds": 3}]
    # staircase area under reference (30, 4): (4-1)*(30-20) + (4-2)*(20-15) + (4-3)*(15-10)
    assert math.isclose(hypervolume(pts, (30, 4)), 30 + 10 + 5)
    assert choose(front, budget=2.5)["gen_ppl"] == 15
    assert choose(front, budget=0)["gen_ppl"] == 15  # the knee


def test_bad_search_config_is_a_clear_error():
    with pytest.raises(ValueError, match="sampler"):
        SearchConfig(sampler="random")
    with pytest.raises(ValueError, match="unknown keys"):
        SearchConfig(space={"temperature": [0, 1]})


def test_named_objectives_and_any_storage_url(sc, tmp_path):
    from esolm.search import METRIC_NAMES, storage_url

    assert storage_url(sc) == f"sqlite:///{Path(sc.out_dir) / 'study.db'}"
    journal = replace(sc, storage=f"journal:{tmp_path / 'shared' / 'study.log'}")
    model = sharp_model("eso_b", alpha_0=0.5)
    study = open_study(journal, "j")
    assert run_study(study, objective_for(fake_evaluator(model), sc.space, "eso_b", 0.0), 2) == 2
    assert (tmp_path / "shared" / "study.log").stat().st_size > 0
    again = open_study(journal, "j")
    assert again.metric_names == METRIC_NAMES and len(again.trials) == 2


def test_concurrent_workers_run_exactly_the_queued_trials(sc):
    """Four workers, each with its own connection to one SQLite study, claim tickets: exactly
    n trials in total, each run once, and every worker's count adds up."""
    from concurrent.futures import ThreadPoolExecutor

    from esolm.search import queue_trials, work

    model = sharp_model("eso_b", alpha_0=0.5)
    objective = objective_for(fake_evaluator(model), sc.space, "eso_b", 0.0)
    assert queue_trials(open_study(sc, "w"), 9) == 9
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda _: work(open_study(sc, "w"), objective), range(4)))
    trials = open_study(sc, "w").trials
    assert sum(counts) == 9 and len(trials) == 9
    assert sorted(t.number for t in trials) == list(range(9))
    assert all(t.state.name == "COMPLETE" and len(t.values) == 2 for t in trials)
    assert queue_trials(open_study(sc, "w"), 9) == 0  # the study is full: nothing more to queue


def test_a_killed_workers_running_trial_is_failed_and_counted(sc):
    from esolm.search import claim, queue_trials

    study = open_study(sc, "k")
    queue_trials(study, 3)
    assert claim(study) is not None  # a worker took a ticket, then died
    model = sharp_model("eso_b", alpha_0=0.5)
    assert run_study(open_study(sc, "k"), objective_for(fake_evaluator(model), sc.space, "eso_b", 0.0), 3) == 2
    states = sorted(t.state.name for t in open_study(sc, "k").trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
