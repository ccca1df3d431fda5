"""The Optuna study of the schedule search: its key, objective, sampler and workers.

Search objectives (both minimised, named for optuna-dashboard): generative perplexity under the
judge, and sampling seconds per sample (measured in the trial's process: the median of
``repeats`` timed generations after ``warmup`` untimed ones; their min and max are the trial's
spread). Constraint: mean sample entropy >= a floor, so degenerate low-entropy schedules cannot
win. Every trial uses the same seed and number of samples.

A search study is named by everything that scores a trial (``scoring``): the contestant's model
file, the judge (its model file, or its ``hf:`` name), the number of samples and their seed, the
entropy floor settings, the search space and the timing settings. Changing any of them starts a
new study; the study keeps them as its user attribute ``scoring``. It lives in any Optuna storage
(``esolm/search/storage.py``).

Workers run Optuna's own loop (``study.optimize``): each trial is asked for, run under a storage
heartbeat, and told. Any number of workers, in any process or on any machine, share one study
until it holds ``n_trials`` trials that count (``counts``: complete, running, waiting, or failed
by their own error); a trial whose worker died (no heartbeat for ``grace_period``) is failed and
queued again by Optuna (``fail_stale_trials``), and a live worker's trial is never touched (a
journal storage has no heartbeats: its RUNNING trials are named on stderr, never failed). A
trial that raises is recorded as failed and the study goes on. Two workers that ask at the very
same moment for the last trial both get one: the later (higher number) is pruned at once with the
user attribute ``surplus`` and left out of the rows, so the counted trials are exactly
``n_trials``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from esolm.search.config import Evaluate, SearchConfig
from esolm.search.results import TrialRow
from esolm.search.storage import note_running, open_storage, storage_url

METRIC_NAMES = ["gen_ppl", "seconds_per_sample"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


def suggest(trial: optuna.Trial, space: dict, family_name: str) -> dict:
    """Schedule settings (``ScheduleSettings`` fields) for one trial from the declared space,
    over the dimensions that apply to the family (``search_dims`` of its record: alpha_0 for
    Eso-LMs only, top_p alone for AR). A block-order trial tunes its chunks and shuffle only:
    the chunks fix its steps, so steps, schedule and gamma are not suggested for it."""
    from esolm.families import family

    dims = family(family_name).search_dims
    p: dict[str, Any] = {}
    if "alpha_0" in dims and "alpha_0" in space:
        p["alpha_0"] = trial.suggest_float("alpha_0", *space["alpha_0"])
    if "order" in dims:
        p["order"] = trial.suggest_categorical("order", space.get("order", ["random"]))
    if p.get("order") == "block":
        p["subcontexts"] = trial.suggest_int("subcontexts", *space.get("subcontexts", [4, 4]))
        p["shuffle"] = trial.suggest_categorical("shuffle", space.get("shuffle", [False]))
    elif "steps" in dims:
        lo, hi = space["steps"]
        p["steps"] = trial.suggest_int("steps", lo, hi, log=True)
        p["schedule"] = trial.suggest_categorical("schedule", space.get("schedule", ["loglinear"]))
        if p["schedule"] == "power":
            p["gamma"] = trial.suggest_float("gamma", *space.get("gamma", [1.0, 1.0]))
    p["top_p"] = trial.suggest_float("top_p", *space.get("top_p", [1.0, 1.0]))
    return p


def make_evaluator(model, judge, tokenizer, num_samples: int, seed: int, repeats: int, warmup: int = 1) -> Evaluate:
    """Sample with the given schedule settings (a partial ``ScheduleSettings`` dict; same seed
    each time): ``warmup`` untimed generations, then ``repeats`` timed ones; judge the samples.
    ``seconds`` is the median per sample, ``seconds_min`` and ``seconds_max`` the spread."""
    from esolm.config import ScheduleSettings
    from esolm.judge import unigram_entropy
    from esolm.sampling import generate

    def evaluate(params: dict) -> dict:
        settings = ScheduleSettings.from_dict({**params, "seed": seed}, "search trial")
        for _ in range(warmup):
            generate(model, num_samples=num_samples, settings=settings)
        times, g = [], None
        for _ in range(repeats):
            g = generate(model, num_samples=num_samples, settings=settings)
            times.append(g.seconds / num_samples)
        texts = tokenizer.decode_batch(g.tokens.tolist(), skip_special_tokens=False)
        ent = statistics.mean(unigram_entropy(ids) for ids in g.tokens.tolist())
        return {"gen_ppl": judge.score(texts)["gen_ppl"], "seconds": statistics.median(times),
                "seconds_min": min(times), "seconds_max": max(times), "nfe": g.nfe, "entropy": ent}

    return evaluate


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return trial.user_attrs.get("constraint", [1.0])


def model_key(path: str | Path) -> str:
    """The content hash (sha256, hex) of a model file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scoring(sc: SearchConfig, model: str, judge: str) -> dict:
    """Everything that scores a trial: the contestant's model hash, the judge (its model hash or
    ``hf:`` name), the samples (number, seed), the entropy floor settings, the search space and
    the timing settings. The study's key is its hash (``study_key``)."""
    return {"model": model, "judge": judge, "num_samples": sc.num_samples, "seed": sc.seed,
            "entropy_floor": sc.entropy_floor, "entropy_floor_frac": sc.entropy_floor_frac,
            "space": sc.space, "repeats": sc.repeats, "warmup": sc.warmup}


def study_key(scored: dict) -> str:
    """The sha256 (hex) of ``scoring``'s dict in canonical JSON."""
    return hashlib.sha256(json.dumps(scored, sort_keys=True, default=list).encode()).hexdigest()


def study_name(variant: str, key: str) -> str:
    """``schedule-<variant>-<first 16 hex digits of the study key>``."""
    return f"schedule-{variant}-{key[:16]}"


def make_sampler(sc: SearchConfig) -> optuna.samplers.BaseSampler:
    """``search.sampler`` seeded with ``search.seed``, with the entropy floor as its constraint."""
    if sc.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=sc.seed, constraints_func=_constraints,
                                             population_size=max(4, min(20, sc.n_trials // 2)))
    return optuna.samplers.TPESampler(seed=sc.seed, constraints_func=_constraints)


def open_study(sc: SearchConfig, name: str, storage: optuna.storages.BaseStorage | None = None,
               scored: dict | None = None) -> optuna.Study:
    """Create or load study ``name`` in ``storage`` (default: ``search.storage``, with heartbeats)
    with named objectives, and ``scored`` (``scoring``) as its user attribute ``scoring``. On a
    journal storage, RUNNING trials are named on stderr (``storage.note_running``), never failed."""
    given = storage is not None
    storage = storage or open_storage(storage_url(sc), sc.heartbeat_interval, sc.grace_period)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=name, storage=storage, sampler=make_sampler(sc),
                                    directions=["minimize", "minimize"], load_if_exists=True)
        if study.metric_names != METRIC_NAMES:
            study.set_metric_names(METRIC_NAMES)
    if scored is not None and study.user_attrs.get("scoring") != json.loads(json.dumps(scored, default=list)):
        study.set_user_attr("scoring", scored)
    note_running(storage, study, "" if given else storage_url(sc))  # a journal file: RUNNING may be dead
    return study


def objective_for(evaluate: Evaluate, space: dict, family: str, floor: float) -> Callable:
    """The Optuna objective: suggest a schedule, evaluate it, record the entropy constraint
    (``floor - entropy``, feasible when <= 0), NFE, entropy, the timing spread and the schedule
    as user attributes, and return the two search objectives. A non-finite generative perplexity
    fails the trial."""

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest(trial, space, family)
        r = evaluate(params)
        trial.set_user_attr("constraint", [floor - r["entropy"]])
        for k in ("nfe", "entropy", "seconds_min", "seconds_max"):
            if k in r:
                trial.set_user_attr(k, r[k])
        trial.set_user_attr("schedule", params)
        if not math.isfinite(r["gen_ppl"]):
            raise ValueError(f"non-finite generative perplexity for {params}")
        return r["gen_ppl"], r["seconds"]

    return objective


def counts(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts towards ``n_trials``: complete, running, waiting (queued, or a dead
    worker's trial queued again), or failed by its own error. A trial failed for its worker's
    death does not count (its retry does), nor does a surplus trial."""
    states = optuna.trial.TrialState
    if t.state == states.FAIL:
        return "error" in t.user_attrs
    return t.state in (states.COMPLETE, states.RUNNING, states.WAITING)


def reap(study: optuna.Study) -> None:
    """Fail the trials of dead workers (no heartbeat for the grace period) and queue them again
    (``optuna.storages.fail_stale_trials``; nothing without heartbeats). Live trials are kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _missing(study: optuna.Study, n_trials: int) -> tuple[int, int]:
    """(trials missing up to ``n_trials``, trials waiting to be run)."""
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    return max(0, n_trials - sum(map(counts, trials))), waiting


def queue_trials(study: optuna.Study, n_trials: int) -> int:
    """Fail and re-queue dead workers' trials, then queue trials (``study.enqueue_trial``) so
    that the study holds ``n_trials`` that count; returns how many were queued. Safe while other
    workers run: their live trials count and are never failed."""
    reap(study)
    missing, _ = _missing(study, n_trials)
    for _ in range(missing):
        study.enqueue_trial({}, user_attrs={"ticket": True})
    return missing


def _guarded(study: optuna.Study, objective: Callable, n_trials: int, worker: str) -> Callable:
    """``objective`` for one worker: a trial beyond ``n_trials`` (two workers asked for the last
    one at once) is pruned unrun as a surplus; an error is recorded as the trial's ``error``."""

    def run(trial: optuna.Trial) -> Any:
        before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if sum(map(counts, before)) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study already holds search.n_trials trials")
        trial.set_user_attr("worker", worker)  # which machine and process ran it
        try:
            return objective(trial)
        except Exception as err:  # Optuna records the trial as failed and logs the error
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise

    return run


def work(study: optuna.Study, objective: Callable, n_trials: int, progress: bool = False) -> int:
    """Run trials (``study.optimize``, each under a storage heartbeat) until the study holds
    ``n_trials`` that count and none is waiting; returns how many this worker ran."""
    import socket

    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    reap(study)
    if _missing(study, n_trials) == (0, 0):
        return 0
    ran = []
    with tqdm(desc="trials", disable=None if progress else True) as bar:

        def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if not trial.user_attrs.get("surplus"):
                ran.append(trial.number)
                bar.update()
            if _missing(study, n_trials) == (0, 0):
                study.stop()

        study.optimize(_guarded(study, objective, n_trials, f"{socket.gethostname()}:{os.getpid()}"),
                       callbacks=[after], catch=(Exception,))
    return len(ran)


def run_study(study: optuna.Study, objective: Callable, n_trials: int, progress: bool = False) -> int:
    """Queue the missing trials up to ``n_trials`` and run them in this process."""
    queue_trials(study, n_trials)
    return work(study, objective, n_trials, progress)


def study_trials(study: optuna.Study, variant: str) -> list[TrialRow]:
    """Every trial of the study as a typed row, in trial order (surplus trials left out)."""
    return [TrialRow.from_trial(t, variant) for t in study.trials if not t.user_attrs.get("surplus")]


def trial_rows(study: optuna.Study, variant: str) -> list[dict]:
    """``study_trials`` in their JSON form (what ``pareto`` and ``compare_with_default`` take)."""
    return [r.to_json() for r in study_trials(study, variant)]
