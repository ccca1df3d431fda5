"""The schedule search: an Optuna study over the sampling schedule and its speed-quality front.

- ``config.py``: ``SearchConfig`` and the search space (no Optuna needed to read them);
- ``study.py``: the study's key, the objective, the sampler, workers (Optuna's loop, heartbeats);
- ``storage.py``: where a search study lives (any Optuna storage URL) and its SQLite snapshot;
- ``front.py``: the Pareto front, its hypervolume, the chosen schedule, the default schedule set
  against the front, the figure;
- ``results.py``: the typed results (``TrialRow``, ``ParetoFront``, ``BestSchedule``) and the one
  writer and one reader of trials.parquet, pareto.json and best.json.

The public names below load on first use (PEP 562), as in ``esolm/__init__.py``: reading best.json
(``esolm sample`` with ``sample.schedule: best``, which a lean install runs) imports neither
Optuna nor pandas. The imports are spelled out, not ``importlib`` calls, so that
``esolm.codedeps`` follows them to the modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_CONFIG = ("DEFAULT_SPACE", "Evaluate", "SAMPLERS", "SearchConfig")
_STUDY = ("FINISHED", "METRIC_NAMES", "counts", "make_evaluator", "make_sampler", "model_key", "objective_for",
          "open_study", "queue_trials", "reap", "run_study", "scoring", "study_key", "study_name", "study_trials",
          "suggest", "trial_rows", "work")
_STORAGE = ("copy_to_sqlite", "open_storage", "storage_url")
_FRONT = ("by_name", "choose", "compare_with_default", "hypervolume", "matched_time", "pareto", "plot_front")
_RESULTS = ("BestSchedule", "ParetoFront", "TrialRow", "best_schedule", "best_settings", "read_best", "read_front",
            "read_trials", "write_outputs")

if TYPE_CHECKING:
    from esolm.search.config import DEFAULT_SPACE, SAMPLERS, Evaluate, SearchConfig
    from esolm.search.front import (
        by_name,
        choose,
        compare_with_default,
        hypervolume,
        matched_time,
        pareto,
        plot_front,
    )
    from esolm.search.results import (
        BestSchedule,
        ParetoFront,
        TrialRow,
        best_schedule,
        best_settings,
        read_best,
        read_front,
        read_trials,
        write_outputs,
    )
    from esolm.search.storage import copy_to_sqlite, open_storage, storage_url
    from esolm.search.study import (
        FINISHED,
        METRIC_NAMES,
        counts,
        make_evaluator,
        make_sampler,
        model_key,
        objective_for,
        open_study,
        queue_trials,
        reap,
        run_study,
        scoring,
        study_key,
        study_name,
        study_trials,
        suggest,
        trial_rows,
        work,
    )


def __getattr__(name: str) -> Any:
    if name in _CONFIG:
        from esolm.search import config as module
    elif name in _STUDY:
        from esolm.search import study as module
    elif name in _STORAGE:
        from esolm.search import storage as module
    elif name in _FRONT:
        from esolm.search import front as module
    elif name in _RESULTS:
        from esolm.search import results as module
    else:
        raise AttributeError(f"module 'esolm.search' has no attribute {name!r}")
    return getattr(module, name)


__all__ = ["DEFAULT_SPACE", "FINISHED", "METRIC_NAMES", "SAMPLERS", "BestSchedule", "Evaluate", "ParetoFront",
           "SearchConfig", "TrialRow", "best_schedule", "best_settings", "by_name", "choose", "compare_with_default",
           "copy_to_sqlite", "counts", "hypervolume", "make_evaluator", "make_sampler", "matched_time", "model_key",
           "objective_for", "open_storage", "open_study", "pareto", "plot_front", "queue_trials", "read_best",
           "read_front", "read_trials", "reap", "run_study", "scoring", "storage_url", "study_key", "study_name",
           "study_trials", "suggest", "trial_rows", "work", "write_outputs"]
