"""Optuna search over the sampling schedule for the speed-quality Pareto frontier.

Objectives (both minimised, named for optuna-dashboard): generative perplexity under the judge,
and sampling seconds per sample (measured in the trial's process, median of ``repeats``).
Constraint: mean sample entropy >= a floor, so degenerate low-entropy schedules cannot win.
Every trial uses the same seed and number of samples.

A study belongs to one model file: its name holds the file's content hash, so retraining
starts a new study. The storage is any Optuna storage URL (``search.storage``): SQLite next to
the outputs by default, PostgreSQL or MySQL through SQLAlchemy, or ``journal:PATH`` for a
journal file on a shared filesystem. Trials are handed out as tickets: the coordinator queues
exactly the missing ones (``queue_trials``) and any number of workers, in any process or on
any machine, claim them one at a time (``work``), so the study ends with exactly ``n_trials``
and none is lost or run twice. A trial that raises is recorded as failed and the study goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

SAMPLERS = ("nsga2", "tpe")
METRIC_NAMES = ["gen_ppl", "seconds_per_sample"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
log = logging.getLogger(__name__)
DEFAULT_SPACE: dict[str, Any] = {
    "steps": [4, 64],
    "alpha_0": [0.0, 1.0],
    "order": ["random", "block"],
    "subcontexts": [2, 16],
    "shuffle": [False, True],
    "schedule": ["loglinear", "power"],
    "gamma": [0.5, 3.0],
    "top_p": [0.8, 1.0],
}


@dataclass(frozen=True)
class SearchConfig:
    variant: str = "eso_b_a05"
    n_trials: int = 12
    sampler: str = "nsga2"
    num_samples: int = 8
    repeats: int = 1
    seed: int = 0
    entropy_floor: float = 0.0          # absolute floor (nats); 0: use entropy_floor_frac
    entropy_floor_frac: float = 0.9     # fraction of the validation text's mean entropy
    time_budget: float = 0.0            # seconds per sample for the chosen schedule (0: the knee)
    default_steps: tuple[int, ...] = (4, 8, 16, 32, 64)
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))
    out_dir: str = "reports/search"
    storage: str = ""                   # Optuna storage URL or journal:PATH; "": SQLite in out_dir

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"search.sampler={self.sampler!r} is unknown: use one of {SAMPLERS}")
        if self.n_trials < 1 or self.num_samples < 1 or self.repeats < 1:
            raise ValueError("search.n_trials, search.num_samples and search.repeats must be >= 1")
        unknown = set(self.space) - set(DEFAULT_SPACE)
        if unknown:
            raise ValueError(f"search.space has unknown keys {sorted(unknown)}; use {sorted(DEFAULT_SPACE)}")


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


Evaluate = Callable[[dict], dict]  # schedule settings (a partial dict) -> {"gen_ppl", "seconds", "nfe", "entropy"}


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


def storage_url(sc: SearchConfig) -> str:
    """``search.storage``, or the default SQLite file ``<out_dir>/study.db``."""
    return sc.storage or f"sqlite:///{Path(sc.out_dir) / 'study.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``journal:PATH`` (a journal file, for shared filesystems)
    or any SQLAlchemy URL (sqlite:///..., postgresql://..., mysql+pymysql://...)."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several processes write one SQLite file: wait for its lock instead of failing
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
        _begin_immediate(storage.engine)
        return storage
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _begin_immediate(engine: Any) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE``, so two workers could claim the same ticket:
    start every transaction with ``BEGIN IMMEDIATE`` (SQLite's write lock) so that reading a
    ticket and marking it RUNNING is atomic, as it is on PostgreSQL and MySQL."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


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


def open_study(sc: SearchConfig, name: str, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load study ``name`` in ``storage`` (default: ``search.storage``) with named objectives."""
    if sc.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=sc.seed, constraints_func=_constraints,
                                                population_size=max(4, min(20, sc.n_trials // 2)))
    else:
        sampler = optuna.samplers.TPESampler(seed=sc.seed, constraints_func=_constraints)
    study = optuna.create_study(study_name=name, storage=storage or open_storage(storage_url(sc)),
                                sampler=sampler, directions=["minimize", "minimize"], load_if_exists=True)
    if study.metric_names != METRIC_NAMES:
        study.set_metric_names(METRIC_NAMES)
    return study


def objective_for(evaluate: Evaluate, space: dict, family: str, floor: float) -> Callable:
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
    with tqdm(desc="trials", disable=not progress) as bar:
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


def copy_to_sqlite(study: optuna.Study, path: Path) -> None:
    """A SQLite snapshot of ``study`` at ``path`` (replacing the file), for a study kept in a
    server database: the DVC output then records the trials the outputs were computed from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                      to_storage=f"sqlite:///{tmp}")
    os.replace(tmp, path)


def trial_rows(study: optuna.Study, variant: str) -> list[dict]:
    rows = []
    for t in study.trials:
        c = t.user_attrs.get("constraint")
        rows.append({"variant": variant, "trial": t.number, "state": t.state.name,
                     "feasible": bool(c is not None and c[0] <= 0 and t.state.name == "COMPLETE"),
                     "gen_ppl": t.values[0] if t.values else None, "seconds": t.values[1] if t.values else None,
                     "nfe": t.user_attrs.get("nfe"), "entropy": t.user_attrs.get("entropy"),
                     "params": t.user_attrs.get("schedule", dict(t.params))})
    return rows


def pareto(points: list[dict], keys: tuple[str, str] = ("gen_ppl", "seconds")) -> list[dict]:
    """The non-dominated points (both keys minimised), sorted by the second key."""
    a, b = keys
    front = [p for p in points
             if not any(q[a] <= p[a] and q[b] <= p[b] and (q[a] < p[a] or q[b] < p[b]) for q in points)]
    return sorted(front, key=lambda p: (p[b], p[a]))


def hypervolume(front: list[dict], ref: tuple[float, float], keys: tuple[str, str] = ("gen_ppl", "seconds")) -> float:
    """Area dominated by ``front`` and bounded by ``ref`` (both objectives minimised)."""
    a, b = keys
    pts = sorted((p[b], p[a]) for p in pareto(front, keys) if p[a] < ref[0] and p[b] < ref[1])
    area, prev_a = 0.0, ref[0]
    for sec, val in pts:
        if val < prev_a:
            area += (ref[1] - sec) * (prev_a - val)
            prev_a = val
    return area


def choose(front: list[dict], budget: float) -> dict | None:
    """Best quality within the time budget, else the knee (closest to the utopia point, normalised)."""
    if not front:
        return None
    if budget > 0:
        within = [p for p in front if p["seconds"] <= budget]
        if within:
            return min(within, key=lambda p: p["gen_ppl"])
    lo_p, hi_p = min(p["gen_ppl"] for p in front), max(p["gen_ppl"] for p in front)
    lo_s, hi_s = min(p["seconds"] for p in front), max(p["seconds"] for p in front)

    def dist(p: dict) -> float:
        return math.hypot((p["gen_ppl"] - lo_p) / (hi_p - lo_p or 1), (p["seconds"] - lo_s) / (hi_s - lo_s or 1))

    return min(front, key=dist)


def compare_with_default(evaluate: Evaluate, searched: list[dict], steps: tuple[int, ...], floor: float) -> dict:
    """The paper's default schedule (log-linear binomial counts, random order) over a grid of T,
    against the searched front: hypervolumes and the gen-PPL gap at matched sampling time."""
    default = []
    for t in steps:
        r = evaluate({"steps": t, "order": "random", "schedule": "loglinear"})  # other settings: defaults
        default.append({**r, "steps": t, "feasible": r["entropy"] >= floor})
    feas_default = [p for p in default if p["feasible"]]
    both = feas_default + searched
    if not both:
        return {"default": default}
    ref = (max(p["gen_ppl"] for p in both) * 1.1, max(p["seconds"] for p in both) * 1.1)
    matched = []
    for d in feas_default:
        faster = [p for p in searched if p["seconds"] <= d["seconds"]]
        if faster:
            best = min(faster, key=lambda p: p["gen_ppl"])
            matched.append({"steps": d["steps"], "default_gen_ppl": d["gen_ppl"], "searched_gen_ppl": best["gen_ppl"],
                            "seconds": d["seconds"], "difference": best["gen_ppl"] - d["gen_ppl"]})
    return {"default": default, "reference_point": ref, "hypervolume_default": hypervolume(feas_default, ref),
            "hypervolume_searched": hypervolume(searched, ref), "matched_time": matched}


def plot_front(rows: list[dict], front: list[dict], default: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    done = [r for r in rows if r["gen_ppl"] is not None]
    ax.scatter([r["seconds"] for r in done], [r["gen_ppl"] for r in done], s=14, alpha=0.5,
               c=["tab:blue" if r["feasible"] else "tab:grey" for r in done], label="trials (grey: infeasible)")
    ax.plot([p["seconds"] for p in front], [p["gen_ppl"] for p in front], "o-", color="tab:orange",
            label="Pareto front")
    if default:
        ax.plot([p["seconds"] for p in default], [p["gen_ppl"] for p in default], "s--", color="k",
                label="default schedule (T grid)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling time per sample (s)")
    ax.set_ylabel("generative perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_settings(best: dict | None) -> dict | None:
    """The chosen trial's schedule as ``best.json`` stores it: every schedule field of
    ``ScheduleSettings`` (defaults where the trial did not set one; no run fields such as the
    seed), so that reading it back gives the same settings."""
    from esolm.config import ScheduleSettings

    if best is None:
        return None
    return ScheduleSettings.from_dict(best["params"], "search trial").to_dict(run=False)


def write_outputs(sc: SearchConfig, rows: list[dict], comparison: dict, floor: float) -> dict:
    """trials.parquet, pareto.json, best.json and pareto.png under ``out_dir``."""
    import pandas as pd

    from esolm.io import atomic_path, write_json

    out = Path(sc.out_dir)
    frame = pd.DataFrame([{**r, "params": json.dumps(r["params"])} for r in rows])
    with atomic_path(out / "trials.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    front = pareto([r for r in rows if r["feasible"]])
    best = choose(front, sc.time_budget)
    write_json(out / "pareto.json", {"variant": sc.variant, "entropy_floor": floor, "front": front,
                                     "comparison": comparison})
    write_json(out / "best.json", {"variant": sc.variant, "schedule": best_settings(best),
                                   "gen_ppl": best["gen_ppl"] if best else None,
                                   "seconds": best["seconds"] if best else None, "time_budget": sc.time_budget})
    plot_front(rows, front, comparison.get("default", []), out / "pareto.png")
    return {"trials": len(rows), "front": front, "best": best}
