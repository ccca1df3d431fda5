"""The Optuna study of the schedule search: its config, objective, sampler, tickets and workers.

Search objectives (both minimised, named for optuna-dashboard): generative perplexity under the
judge, and sampling seconds per sample (measured in the trial's process, median of ``repeats``).
Constraint: mean sample entropy >= a floor, so degenerate low-entropy schedules cannot win.
Every trial uses the same seed and number of samples.

A search study belongs to one model file: its name holds the file's content hash, so retraining
starts a new study; it lives in any Optuna storage (``esolm/search/storage.py``). Trials are
handed out as tickets: the coordinator queues exactly the missing ones (``queue_trials``) and any
number of workers, in any process or on any machine, claim them one at a time (``work``), so the
study ends with exactly ``n_trials`` and none is lost or run twice. A trial that raises is
recorded as failed and the study goes on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from esolm.search.config import Evaluate, SearchConfig
from esolm.search.results import TrialRow
from esolm.search.storage import open_storage, storage_url

METRIC_NAMES = ["gen_ppl", "seconds_per_sample"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
log = logging.getLogger(__name__)


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




def make_evaluator(model, judge, tokenizer, num_samples: int, seed: int, repeats: int) -> Evaluate:
    """Sample with the given schedule settings (a partial ``ScheduleSettings`` dict; same seed
    each time), time it, and judge the samples."""
    from esolm.config import ScheduleSettings
    from esolm.judge import unigram_entropy
    from esolm.sampling import generate

    def evaluate(params: dict) -> dict:
        settings = ScheduleSettings.from_dict({**params, "seed": seed}, "search trial")
        times, g = [], None
        for _ in range(repeats):
            g = generate(model, num_samples=num_samples, settings=settings)
            times.append(g.seconds / num_samples)
        texts = tokenizer.decode_batch(g.tokens.tolist(), skip_special_tokens=False)
        ent = statistics.mean(unigram_entropy(ids) for ids in g.tokens.tolist())
        return {"gen_ppl": judge.score(texts)["gen_ppl"], "seconds": statistics.median(times),
                "nfe": g.nfe, "entropy": ent}

    return evaluate


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return trial.user_attrs.get("constraint", [1.0])


def model_key(path: str | Path) -> str:
    """The content hash (sha256, hex) of a model file: the identity of its study."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def study_name(variant: str, key: str) -> str:
    """``schedule-<variant>-<first 16 hex digits of the model hash>``."""
    return f"schedule-{variant}-{key[:16]}"


def make_sampler(sc: SearchConfig) -> optuna.samplers.BaseSampler:
    """``search.sampler`` seeded with ``search.seed``, with the entropy floor as its constraint."""
    if sc.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=sc.seed, constraints_func=_constraints,
                                             population_size=max(4, min(20, sc.n_trials // 2)))
    return optuna.samplers.TPESampler(seed=sc.seed, constraints_func=_constraints)


def open_study(sc: SearchConfig, name: str, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load study ``name`` in ``storage`` (default: ``search.storage``) with named objectives."""
    study = optuna.create_study(study_name=name, storage=storage or open_storage(storage_url(sc)),
                                sampler=make_sampler(sc), directions=["minimize", "minimize"],
                                load_if_exists=True)
    if study.metric_names != METRIC_NAMES:
        study.set_metric_names(METRIC_NAMES)
    return study


def objective_for(evaluate: Evaluate, space: dict, family: str, floor: float) -> Callable:
    """The Optuna objective: suggest a schedule, evaluate it, record the entropy constraint
    (``floor - entropy``, feasible when <= 0), NFE, entropy and the schedule as user attributes,
    and return the two search objectives. A non-finite generative perplexity fails the trial."""

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest(trial, space, family)
        r = evaluate(params)
        trial.set_user_attr("constraint", [floor - r["entropy"]])
        for k in ("nfe", "entropy"):
            trial.set_user_attr(k, r[k])
        trial.set_user_attr("schedule", params)
        if not math.isfinite(r["gen_ppl"]):
            raise ValueError(f"non-finite generative perplexity for {params}")
        return r["gen_ppl"], r["seconds"]

    return objective


def queue_trials(study: optuna.Study, n_trials: int) -> int:
    """Queue tickets so that the study holds exactly ``n_trials`` trials; returns how many were
    queued. Trials left RUNNING by a killed search are marked failed first (they count, like any
    failed trial), so run this only while no worker of the study is running."""
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)
    held = len(study.get_trials(deepcopy=False, states=(*FINISHED, states.WAITING)))
    missing = max(0, n_trials - held)
    for _ in range(missing):
        study.enqueue_trial({}, user_attrs={"ticket": True})
    return missing


def claim(study: optuna.Study) -> optuna.Trial | None:
    """Take one queued ticket (an atomic WAITING -> RUNNING change in the storage, so two
    workers never get the same one) and return it as a trial; None when no ticket is left.
    Unlike ``study.ask()`` this never creates a trial, so workers cannot overshoot."""
    storage = study._storage  # the storage the study was opened with; Optuna has no public getter
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Callable) -> optuna.trial.TrialState:
    """Evaluate one claimed trial and record it: COMPLETE with its values, or FAIL with the error."""
    try:
        values = objective(trial)
    except Exception as err:
        log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
        trial.set_user_attr("error", f"{type(err).__name__}: {err}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return optuna.trial.TrialState.FAIL
    study.tell(trial, values)
    return optuna.trial.TrialState.COMPLETE


def work(study: optuna.Study, objective: Callable, progress: bool = False) -> int:
    """Claim and run queued trials until none is left; returns how many this worker ran."""
    import socket

    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran = 0
    with tqdm(desc="trials", disable=None if progress else True) as bar:
        while (trial := claim(study)) is not None:
            trial.set_user_attr("worker", worker)  # which machine and process ran it
            run_trial(study, trial, objective)
            ran += 1
            bar.update()
    return ran


def run_study(study: optuna.Study, objective: Callable, n_trials: int, progress: bool = False) -> int:
    """Queue the missing trials up to ``n_trials`` and run them in this process."""
    queue_trials(study, n_trials)
    return work(study, objective, progress)


def study_trials(study: optuna.Study, variant: str) -> list[TrialRow]:
    """Every trial of the study as a typed row, in trial order."""
    return [TrialRow.from_trial(t, variant) for t in study.trials]


def trial_rows(study: optuna.Study, variant: str) -> list[dict]:
    """``study_trials`` in their JSON form (what ``pareto`` and ``compare_with_default`` take)."""
    return [r.to_json() for r in study_trials(study, variant)]
