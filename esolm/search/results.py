"""The schedule search's results, typed, and the files that hold them: the one writer and the one
reader of each of ``trials.parquet``, ``pareto.json`` and ``best.json`` (under ``search.out_dir``).

- ``TrialRow``: one trial of the search study (a row of trials.parquet, an entry of the front);
- ``ParetoFront``: pareto.json, the feasible trials no other feasible trial beats on both search
  objectives, and the default schedule set against them;
- ``BestSchedule``: best.json, the schedule chosen from the front (``sample.schedule: best``).

Each has ``to_json()`` and ``from_json()``. This module imports neither Optuna nor pandas at
import time (reading best.json is part of ``esolm sample``, which a lean install runs), and only
``BestSchedule`` needs ``esolm.config`` (so a reader of the trials or the front, such as the
results database, does not depend on it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import optuna

    from esolm.config import ScheduleSettings
    from esolm.search.config import SearchConfig

TRIALS, FRONT, BEST, FIGURE = "trials.parquet", "pareto.json", "best.json", "pareto.png"


def _check_keys(cls: type, values: dict, where: str, optional: tuple[str, ...] = ()) -> None:
    """An unknown or (unless ``optional``) missing key of ``values`` is an error naming it."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if n not in values and n not in optional]
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}; a {cls.__name__} has "
                         f"{names}: write it with esolm search (esolm search --only outputs)")


def _plain(value: Any) -> Any:
    """A numpy scalar as a Python value, NaN as None (what pandas gives back for a missing value)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass(frozen=True)
class TrialRow:
    """One trial of the search study: a row of trials.parquet (and of the ``search_trials``
    table), an entry of pareto.json's front."""

    variant: str
    """The variant whose model file the study searches (``search.variant``)."""
    trial: int
    """Optuna's trial number in the study (0, 1, ...)."""
    state: str
    """Optuna's trial state: COMPLETE, FAIL, PRUNED, RUNNING or WAITING."""
    feasible: bool
    """COMPLETE and the samples' entropy at or above the floor: may be on the front."""
    gen_ppl: float | None
    """First search objective: generative perplexity of the samples under the judge (None unless COMPLETE)."""
    seconds: float | None
    """Second search objective: sampling seconds per sample, median of the repeats (None unless COMPLETE)."""
    nfe: int | None
    """Forward passes of one generation (None when the trial failed before sampling)."""
    entropy: float | None
    """Mean unigram entropy of the samples (nats); the constraint is entropy >= the floor."""
    params: dict
    """The trial's schedule settings as suggested (a partial ``ScheduleSettings`` dict)."""
    seconds_min: float | None = None
    """The fastest of the timed repeats (seconds per sample): with ``seconds_max``, the spread of
    ``seconds`` (None unless COMPLETE, and in files written before it was recorded)."""
    seconds_max: float | None = None
    """The slowest of the timed repeats (seconds per sample)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("seconds_min", "seconds_max")

    @classmethod
    def from_trial(cls, t: optuna.trial.FrozenTrial, variant: str) -> TrialRow:
        """The row of a trial of ``variant``'s study (its values and user attributes)."""
        c = t.user_attrs.get("constraint")
        complete = t.state.name == "COMPLETE"
        return cls(variant=variant, trial=t.number, state=t.state.name,
                   feasible=bool(c is not None and c[0] <= 0 and complete),
                   gen_ppl=t.values[0] if t.values else None, seconds=t.values[1] if t.values else None,
                   nfe=t.user_attrs.get("nfe"), entropy=t.user_attrs.get("entropy"),
                   params=t.user_attrs.get("schedule", dict(t.params)),
                   seconds_min=t.user_attrs.get("seconds_min") if complete else None,
                   seconds_max=t.user_attrs.get("seconds_max") if complete else None)

    def objectives(self) -> tuple[float, float]:
        """(gen_ppl, seconds): the point of this trial for ``pareto``, ``choose`` and ``hypervolume``."""
        if self.gen_ppl is None or self.seconds is None:
            raise ValueError(f"trial {self.trial} ({self.state}) has no search objectives: only COMPLETE "
                             "trials do; pass the feasible rows")
        return self.gen_ppl, self.seconds

    def to_json(self) -> dict:
        """The row as a dict, keys in field order (pareto.json's front entries)."""
        return {f.name: dict(self.params) if f.name == "params" else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, values: dict, where: str = "trial row") -> TrialRow:
        """The inverse of ``to_json``; an unknown or missing key is an error naming it (the spread
        may be missing: files written before it)."""
        _check_keys(cls, values, where, optional=cls.OPTIONAL)
        return cls(**{**values, "params": dict(values["params"])})

    def to_row(self) -> dict:
        """The row as trials.parquet stores it: ``params`` as a JSON string."""
        return {**self.to_json(), "params": json.dumps(self.params)}

    @classmethod
    def from_row(cls, record: dict, where: str = TRIALS) -> TrialRow:
        """The inverse of ``to_row`` for a record pandas read back (numpy scalars, NaN for None)."""
        values = {k: _plain(v) for k, v in record.items()}
        values["params"] = json.loads(values.get("params") or "{}")
        if values.get("nfe") is not None:
            values["nfe"] = int(values["nfe"])  # a column with a None is read back as floats
        return cls.from_json(values, where)


@dataclass(frozen=True)
class ParetoFront:
    """pareto.json: the Pareto front of the feasible trials and the default schedule's comparison."""

    variant: str
    """The variant whose model file the study searched."""
    entropy_floor: float
    """The entropy floor (nats) the trials were held to."""
    front: list[TrialRow]
    """The non-dominated feasible trials, sorted by seconds per sample (``front.pareto``)."""
    comparison: dict = field(default_factory=dict)
    """The default schedule over ``search.default_steps`` against the front (``front.compare_with_default``:
    default, reference_point, hypervolume_default, hypervolume_searched, matched_time); {} when not run."""

    def to_json(self) -> dict:
        """pareto.json's content: the front's trials in their JSON form."""
        return {"variant": self.variant, "entropy_floor": self.entropy_floor,
                "front": [p.to_json() for p in self.front], "comparison": self.comparison}

    @classmethod
    def from_json(cls, values: dict, where: str = FRONT) -> ParetoFront:
        """The inverse of ``to_json``; an unknown or missing key is an error naming it."""
        _check_keys(cls, values, where, optional=("comparison",))
        return cls(variant=values["variant"], entropy_floor=values["entropy_floor"],
                   front=[TrialRow.from_json(p, f"{where} front") for p in values["front"]],
                   comparison=values.get("comparison", {}))


@dataclass(frozen=True)
class BestSchedule:
    """best.json: the schedule chosen from the front, what ``sample.schedule: best`` samples with."""

    variant: str | None = None
    """The variant whose model file the study searched."""
    schedule: ScheduleSettings | None = None
    """The chosen trial's schedule: every schedule field, no run fields (``to_dict(run=False)``);
    None when no trial was feasible."""
    gen_ppl: float | None = None
    """The chosen trial's generative perplexity under the judge."""
    seconds: float | None = None
    """The chosen trial's sampling seconds per sample."""
    time_budget: float = 0.0
    """``search.time_budget`` it was chosen under (0: the knee of the front)."""
    trial: int | None = None
    """The chosen trial's number in the search study (None: none feasible, or a hand-written file)."""
    searched: dict | None = None
    """The chosen trial's parameters exactly as the study holds them (``trial.params``); the
    schedule above is these with the defaults of the settings they leave out."""

    # settings an order never reads: best.json leaves them out, so it shows only what ran
    UNUSED: ClassVar[dict[str, tuple[str, ...]]] = {"block": ("steps", "schedule", "gamma"),
                                                    "random": ("subcontexts", "shuffle")}

    @classmethod
    def of(cls, variant: str, chosen: TrialRow | None, time_budget: float) -> BestSchedule:
        """The record of the trial ``choose`` picked (None: no feasible trial)."""
        from esolm.config import ScheduleSettings

        if chosen is None:
            return cls(variant=variant, time_budget=time_budget)
        schedule = ScheduleSettings.from_dict(chosen.params, f"search trial {chosen.trial}")
        return cls(variant=variant, schedule=schedule, gen_ppl=chosen.gen_ppl, seconds=chosen.seconds,
                   time_budget=time_budget, trial=chosen.trial, searched=dict(chosen.params))

    def settings(self, where: str = BEST) -> ScheduleSettings:
        """The chosen schedule; an error says what to do when the search found none feasible."""
        if self.schedule is None:
            raise ValueError(f"{where} holds no feasible schedule; lower search.entropy_floor_frac or add trials")
        return self.schedule

    def to_json(self) -> dict:
        """best.json's content: the schedule as ``ScheduleSettings.to_dict(run=False)``."""
        schedule = None
        if self.schedule is not None:
            unused = self.UNUSED.get(self.schedule.order, ())
            schedule = {k: v for k, v in self.schedule.to_dict(run=False).items() if k not in unused}
        return {"variant": self.variant, "schedule": schedule, "gen_ppl": self.gen_ppl, "seconds": self.seconds,
                "time_budget": self.time_budget, "trial": self.trial, "searched": self.searched}

    @classmethod
    def from_json(cls, values: dict, where: str = BEST) -> BestSchedule:
        """The inverse of ``to_json``. Keys left out keep their defaults (a hand-written best.json
        may hold only the schedule); an unknown key, in the file or in its schedule, is an error."""
        from esolm.config import ScheduleSettings

        _check_keys(cls, values, where, optional=tuple(f.name for f in fields(cls)))
        chosen = values.get("schedule")
        schedule = ScheduleSettings.from_dict(chosen, f"{where} schedule") if chosen else None
        return cls(**{**values, "schedule": schedule})


def best_settings(best: dict | None) -> dict | None:
    """The schedule of a chosen trial row (a dict) as ``best.json`` stores it: every schedule
    field of ``ScheduleSettings`` (defaults where the trial did not set one; no run fields such
    as the seed), so that reading it back gives the same settings."""
    from esolm.config import ScheduleSettings

    if best is None:
        return None
    return ScheduleSettings.from_dict(best["params"], "search trial").to_dict(run=False)


def write_outputs(sc: SearchConfig, rows: Sequence[TrialRow | dict], comparison: dict, floor: float) -> dict:
    """trials.parquet, pareto.json, best.json and pareto.png under ``sc.out_dir`` from every
    trial of the study (rows typed or in their JSON form). Returns the trial count, the front
    and the chosen trial (None: none feasible) in JSON form."""
    from esolm.search.front import choose, pareto, plot_front

    trials = [r if isinstance(r, TrialRow) else TrialRow.from_json(r) for r in rows]
    out = Path(sc.out_dir)
    front = pareto([r for r in trials if r.feasible], TrialRow.objectives)
    chosen = choose(front, sc.time_budget, TrialRow.objectives)
    _write_trials(out, trials)
    _write_front(out, ParetoFront(sc.variant, floor, front, comparison))
    _write_best(out, BestSchedule.of(sc.variant, chosen, sc.time_budget))
    plot_front(trials, front, comparison.get("default", []), out / FIGURE)
    return {"trials": len(trials), "front": [p.to_json() for p in front],
            "best": chosen.to_json() if chosen else None}


def _write_trials(out_dir: Path, rows: list[TrialRow]) -> None:
    import pandas as pd

    from esolm.io import atomic_path

    with atomic_path(out_dir / TRIALS) as tmp:
        pd.DataFrame([r.to_row() for r in rows]).to_parquet(tmp, index=False)


def _write_front(out_dir: Path, front: ParetoFront) -> None:
    from esolm.io import write_json

    write_json(out_dir / FRONT, front.to_json())


def _write_best(out_dir: Path, best: BestSchedule) -> None:
    from esolm.io import write_json

    write_json(out_dir / BEST, best.to_json())


def _existing(out_dir: str | Path, name: str) -> Path:
    path = Path(out_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the schedule search first (esolm search)")
    return path


def read_trials(out_dir: str | Path) -> list[TrialRow]:
    """``out_dir/trials.parquet``: every trial of the study, in trial order."""
    import pandas as pd

    path = _existing(out_dir, TRIALS)
    return [TrialRow.from_row(r, str(path)) for r in pd.read_parquet(path).to_dict("records")]


def read_front(out_dir: str | Path) -> ParetoFront:
    """``out_dir/pareto.json``: the Pareto front and the default schedule's comparison."""
    path = _existing(out_dir, FRONT)
    return ParetoFront.from_json(json.loads(path.read_text()), str(path))


def read_best(out_dir: str | Path) -> BestSchedule:
    """``out_dir/best.json``: the chosen schedule and its search objectives."""
    path = _existing(out_dir, BEST)
    return BestSchedule.from_json(json.loads(path.read_text()), str(path))


def best_schedule(out_dir: str | Path) -> ScheduleSettings:
    """The schedule chosen by the search (``sample.schedule=best``): ``out_dir/best.json``,
    read back into the settings it was written from (an unknown key names the closest)."""
    return read_best(out_dir).settings(str(Path(out_dir) / BEST))
