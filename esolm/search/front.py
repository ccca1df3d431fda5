"""The speed-quality Pareto front of the schedule search: the front, its hypervolume, the chosen
schedule, the paper's default schedule set against the front, and the figure.

Both search objectives are minimised: generative perplexity and seconds per sample. A point is
anything ``objectives`` maps to that pair: a dict with the keys ``gen_ppl`` and ``seconds`` (the
default) or a ``TrialRow`` (``objectives=TrialRow.objectives``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from esolm.search.config import Evaluate

P = TypeVar("P")
Objectives = Callable[[Any], tuple[float, float]]  # a point -> (gen_ppl, seconds)


def by_name(point: dict) -> tuple[float, float]:
    """The search objectives of a dict point: its ``gen_ppl`` and ``seconds``."""
    return point["gen_ppl"], point["seconds"]


def pareto(points: Sequence[P], objectives: Objectives = by_name) -> list[P]:
    """The non-dominated points (both objectives minimised), sorted by seconds, then gen_ppl."""
    values = [objectives(p) for p in points]
    front = [p for p, (a, b) in zip(points, values)
             if not any(qa <= a and qb <= b and (qa < a or qb < b) for qa, qb in values)]
    return sorted(front, key=lambda p: objectives(p)[::-1])


def hypervolume(front: Sequence[P], ref: tuple[float, float], objectives: Objectives = by_name) -> float:
    """Area dominated by ``front`` and bounded by ``ref`` = (gen_ppl, seconds), both minimised."""
    pts = sorted((b, a) for a, b in map(objectives, pareto(front, objectives)) if a < ref[0] and b < ref[1])
    area, prev_a = 0.0, ref[0]
    for sec, val in pts:
        if val < prev_a:
            area += (ref[1] - sec) * (prev_a - val)
            prev_a = val
    return area


def choose(front: Sequence[P], budget: float, objectives: Objectives = by_name) -> P | None:
    """Best quality within the time budget (seconds per sample; 0: none), else the knee: the
    point closest to the utopia point, each objective normalised to [0, 1] over the front."""
    if not front:
        return None
    values = [objectives(p) for p in front]
    if budget > 0:
        within = [(v, p) for v, p in zip(values, front) if v[1] <= budget]
        if within:
            return min(within, key=lambda vp: vp[0][0])[1]
    lo_p, hi_p = min(v[0] for v in values), max(v[0] for v in values)
    lo_s, hi_s = min(v[1] for v in values), max(v[1] for v in values)

    def dist(vp: tuple[tuple[float, float], P]) -> float:
        (ppl, sec), _ = vp
        return math.hypot((ppl - lo_p) / (hi_p - lo_p or 1), (sec - lo_s) / (hi_s - lo_s or 1))

    return min(zip(values, front), key=dist)[1]


def compare_with_default(evaluate: Evaluate, searched: list[dict], steps: tuple[int, ...], floor: float) -> dict:
    """The paper's default schedule (log-linear binomial counts, random order) over a grid of T,
    against the searched front (dict points): hypervolumes and the gen-PPL gap at matched
    sampling time. This dict is pareto.json's ``comparison``."""
    default = []
    for t in steps:
        r = evaluate({"steps": t, "order": "random", "schedule": "loglinear"})  # other settings: defaults
        default.append({**r, "steps": t, "feasible": r["entropy"] >= floor})
    feas_default = [p for p in default if p["feasible"]]
    both = feas_default + searched
    if not both:
        return {"default": default}
    ref = (max(p["gen_ppl"] for p in both) * 1.1, max(p["seconds"] for p in both) * 1.1)
    return {"default": default, "reference_point": ref, "hypervolume_default": hypervolume(feas_default, ref),
            "hypervolume_searched": hypervolume(searched, ref), "matched_time": matched_time(feas_default, searched)}


def matched_time(default: list[dict], searched: list[dict]) -> list[dict]:
    """For each default point, the best searched point no slower than it, and the gen-PPL gap."""
    matched = []
    for d in default:
        faster = [p for p in searched if p["seconds"] <= d["seconds"]]
        if faster:
            best = min(faster, key=lambda p: p["gen_ppl"])
            matched.append({"steps": d["steps"], "default_gen_ppl": d["gen_ppl"], "searched_gen_ppl": best["gen_ppl"],
                            "seconds": d["seconds"], "difference": best["gen_ppl"] - d["gen_ppl"]})
    return matched


def spread(points: Sequence[Any]) -> list[list[float]] | None:
    """Error bars of the seconds of ``points`` (typed rows or dicts): [below, above] the median,
    from ``seconds_min`` and ``seconds_max``; None when a point lacks them (older results)."""
    get = (lambda p, k: p.get(k)) if points and isinstance(points[0], dict) else getattr
    lo, hi = [get(p, "seconds_min") for p in points], [get(p, "seconds_max") for p in points]
    if not points or None in lo or None in hi:
        return None
    secs = [get(p, "seconds") for p in points]
    return [[max(0.0, s - a) for s, a in zip(secs, lo)], [max(0.0, b - s) for s, b in zip(secs, hi)]]


def plot_front(rows: Sequence[Any], front: Sequence[Any], default: list[dict], path: Path) -> None:
    """pareto.png: every finished trial (grey: infeasible), the front and the default schedule's
    grid of T, gen PPL against seconds per sample (log time axis); the front and the grid carry
    the spread of their timed repeats (min to max) as horizontal error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    done = [r for r in rows if r.gen_ppl is not None]
    ax.scatter([r.seconds for r in done], [r.gen_ppl for r in done], s=14, alpha=0.5,
               c=["tab:blue" if r.feasible else "tab:grey" for r in done], label="trials (grey: infeasible)")
    ax.errorbar([p.seconds for p in front], [p.gen_ppl for p in front], xerr=spread(list(front)), fmt="o-",
                color="tab:orange", capsize=2, label="Pareto front (bars: min-max of repeats)")
    if default:
        ax.errorbar([p["seconds"] for p in default], [p["gen_ppl"] for p in default], xerr=spread(default),
                    fmt="s--", color="k", capsize=2, label="default schedule (T grid)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling time per sample (s)")
    ax.set_ylabel("generative perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
