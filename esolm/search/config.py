"""The ``search:`` section (``SearchConfig``) and the search space; no Optuna needed to read it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SAMPLERS = ("nsga2", "tpe")
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
    """The ``search:`` section: what the schedule search tunes, how, and where its study and
    outputs live."""

    variant: str = "eso_b_a05"
    """The variant whose model file is searched (``runs/<variant>/model.ckpt``)."""
    n_trials: int = 12
    """Trials the study holds in the end: a rerun queues only the missing ones."""
    sampler: str = "nsga2"
    """Optuna's sampler: nsga2 (NSGA-II) or tpe; both respect the entropy constraint."""
    num_samples: int = 8
    """Samples each trial draws (the same seed in every trial) for its search objectives."""
    repeats: int = 3
    """Timed generations per trial, after the warm-up: the seconds objective is their median,
    their min and max the trial's spread (``seconds_min``, ``seconds_max``)."""
    warmup: int = 1
    """Untimed generations of each trial's schedule before the timed ones (allocations, caches)."""
    seed: int = 0
    """Seed of the sampler (a lone worker's trials are reproducible) and of every trial's samples."""
    entropy_floor: float = 0.0
    """Floor (nats) on the samples' mean unigram entropy; 0: use ``entropy_floor_frac``."""
    entropy_floor_frac: float = 0.9
    """The floor as a fraction of the validation text's mean entropy (when ``entropy_floor`` is 0)."""
    time_budget: float = 0.0
    """Seconds per sample the chosen schedule may take (the best quality within it); 0: the knee."""
    default_steps: tuple[int, ...] = (4, 8, 16, 32, 64)
    """The grid of T of the paper's default schedule (log-linear, random order), set against the front."""
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))
    """The search space: a ``ScheduleSettings`` field -> [low, high] or a list of choices
    (keys of ``DEFAULT_SPACE`` only; a key left out keeps ``DEFAULT_SPACE``'s fallback)."""
    out_dir: str = "reports/search"
    """Folder of trials.parquet, pareto.json, best.json, pareto.png and study.db (a SQLite
    snapshot of the study the outputs were computed from)."""
    storage: str = ""
    """Optuna storage URL (sqlite:///..., postgresql+psycopg://..., mysql+pymysql://...) or
    journal:PATH; "": SQLite ``<out_dir>-study.db`` beside the outputs (not one of them: the
    outputs are a snapshot of the study, study.db, which DVC caches). ``${NAME}`` in it is read
    from the environment when the storage is opened (a password or host kept out of params.yaml)."""
    heartbeat_interval: int = 10
    """Seconds between a running trial's heartbeats in an RDB storage (SQLite, PostgreSQL, MySQL;
    a journal file has none): a trial whose worker died is failed and re-queued once its last
    heartbeat is older than ``grace_period``; a live worker's trial is never failed."""
    grace_period: int = 120
    """Seconds without a heartbeat after which a running trial counts as its worker's death."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"search.sampler={self.sampler!r} is unknown: use one of {SAMPLERS}")
        for name in ("n_trials", "num_samples", "repeats", "heartbeat_interval", "grace_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name}={getattr(self, name)!r} is invalid: use an integer >= 1")
        if self.warmup < 0:
            raise ValueError(f"search.warmup={self.warmup!r} is invalid: use an integer >= 0")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"search.grace_period={self.grace_period!r} must exceed search.heartbeat_interval="
                             f"{self.heartbeat_interval!r}, or live trials would be failed between two heartbeats")
        unknown = set(self.space) - set(DEFAULT_SPACE)
        if unknown:
            raise ValueError(f"search.space has unknown keys {sorted(unknown)}; use {sorted(DEFAULT_SPACE)}")
        check_storage(self.storage)


STORAGE_FORMS = ("sqlite:///PATH, journal:PATH, postgresql[+driver]://USER@HOST/DB or "
                 "mysql[+driver]://USER@HOST/DB (\"\": SQLite <out_dir>-study.db; ${NAME}: from the environment)")
_STORAGE = re.compile(r"(sqlite:///.+|journal:.+|(postgresql|mysql|mariadb|oracle|mssql)(\+\w+)?://.+)")
_WHOLE_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def check_storage(url: str) -> None:
    """``search.storage`` is "" or one of the forms Optuna opens (``STORAGE_FORMS``), as written:
    ``${NAME}`` parts stay unexpanded here (``storage.expand_url`` expands them when the storage
    is opened, and checks a URL that is one variable as a whole then)."""
    if url and not _STORAGE.fullmatch(url) and not _WHOLE_VARIABLE.fullmatch(url):
        raise ValueError(f"search.storage={mask_url(url)!r} is not a storage URL: use {STORAGE_FORMS}")


def mask_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (``postgresql://user:***@host/db``): the form a
    storage URL is printed, logged or put in an error in. A URL without one (SQLite, a journal
    file, ``user@host``) is returned as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep or rest.startswith("/"):
        return url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


Evaluate = Callable[[dict], dict]  # schedule settings (a partial dict) -> {"gen_ppl", "seconds", "nfe", "entropy"}
