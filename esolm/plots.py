"""Figures drawn from plain rows, with matplotlib alone (no model code): shared by the verbs that
have the rows in hand (``esolm bench``) and the report, which reads them from DuckDB.

``variant_color`` is the one colour of a variant in every figure (the report's and the bench's):
its family's hue (``Family.color``), shaded by alpha_0 in the families whose alpha_0 is chosen per
variant (Eso-LM (A) and (B): alpha_0 = 1 darkest, smaller alpha_0 lighter); grey for the unigram
baseline and any row of no known family.
"""

from __future__ import annotations

import math
from pathlib import Path

from esolm.families import FAMILIES

SPEEDUP_OF = "eso_b"  # the bench variant whose speedup over every other variant is drawn
OTHER_COLOR = "#7f7f7f"  # the unigram baseline and rows of no known family


def _alpha_shade(alpha_0: float) -> float:
    """Where alpha_0 sits between darker (< 0: toward black) and lighter (> 0: toward white):
    alpha_0 = 1 at -0.4, each halving 0.225 lighter, 1/16 (and below) at 0.5."""
    position = min(1.0, max(0.0, -math.log2(max(alpha_0, 2.0 ** -6)) / 4))
    return -0.4 + 0.9 * position


def variant_color(family: str | None, alpha_0: float | None = None) -> str:
    """The colour (``#rrggbb``) of a variant of ``family`` with ``alpha_0`` in every figure: the
    family's hue; in a family whose alpha_0 is free, a shade of it by alpha_0 (None: the hue
    itself). Variants of one family and one alpha_0 (BD3-LM block sizes) share a colour."""
    from matplotlib.colors import to_hex, to_rgb

    record = FAMILIES.get(family) if family is not None else None
    if record is None:
        return OTHER_COLOR
    rgb = to_rgb(record.color)
    if record.fixed_alpha_0 is not None or alpha_0 is None or math.isnan(alpha_0):
        return to_hex(rgb)
    t = _alpha_shade(alpha_0)
    rgb = tuple(c * (1 + t) for c in rgb) if t < 0 else tuple(c + (1 - c) * t for c in rgb)
    return to_hex(rgb)


def _log_ticks(lo: float, hi: float) -> list[float] | None:
    """Ticks of a base-10 log axis over [lo, hi]: powers of ten, else 1-2-5, else 1-2-3-5-7 per
    decade, the first that puts three or more in range (None: too many; matplotlib's own)."""
    decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
    for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0)):
        ticks = [float(f"{m * 10.0 ** e:.12g}") for e in decades for m in subs if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 3:
            return ticks if len(ticks) <= 9 else None
    return []


def log_axis(ax, which: str, values: list[float], base: float = 10) -> None:
    """A log axis with plain tick labels (0.002, 50, 200; never 2x10^-3): over less than a factor
    of four, five evenly spaced ticks; else powers of ten or 1-2-5 (1-2-3-5-7) per decade."""
    from matplotlib import ticker

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if base == 10 and values:
        lo, hi = min(values) / 1.05, max(values) * 1.05
        ticks = _log_ticks(lo, hi) if hi / lo >= 4 else []
        if ticks:
            axis.set_major_locator(ticker.FixedLocator(ticks))
        elif ticks is not None:
            axis.set_major_locator(ticker.MaxNLocator(nbins=5))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def legend_outside(ax, **kw) -> None:
    """The legend to the right of the axes, so it covers no data (saved with bbox_inches='tight')."""
    if ax.get_legend_handles_labels()[0] or kw.get("handles"):
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kw)


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG with nothing cut off (labels and outside legends kept whole)."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def speedup(rows: list[dict], path: str | Path) -> bool:
    """Speedup of Eso-LM (B) over each bench variant against sequence length, from plain rows
    (``BenchRow.to_json()``, or the throughput table's columns) with variant, family, length,
    nfe_budget, median_s, batch_size and (optionally) alpha_0, device, d_model, n_layers,
    vocab_size: the NFE = L rows of the smallest batch size, each line in its variant's colour
    (``variant_color``). False when there is none."""
    rows = [r for r in rows if r.get("nfe_budget", "L") == "L"]
    if rows:  # one batch size per figure: the smallest timed
        rows = [r for r in rows if r.get("batch_size", 1) == min(q.get("batch_size", 1) for q in rows)]
    eso = {r["length"]: r["median_s"] for r in rows if r["variant"] == SPEEDUP_OF}
    if not eso:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in sorted({r["variant"] for r in rows} - {SPEEDUP_OF}):
        mine = [r for r in rows if r["variant"] == name and r["length"] in eso]
        pts = sorted((r["length"], r["median_s"] / eso[r["length"]]) for r in mine)
        color = variant_color(mine[0].get("family"), mine[0].get("alpha_0")) if mine else OTHER_COLOR
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"over {name}")
    ax.axhline(1.0, color="grey", lw=0.8)
    log_axis(ax, "x", [], base=2)
    log_axis(ax, "y", [line_y for line in ax.get_lines() for line_y in line.get_ydata()] + [1.0])
    ax.set_xlabel("sequence length L (NFE = L)")
    ax.set_ylabel("Eso-LM (B) speedup (x)")
    legend_outside(ax)
    first = rows[0]
    size = (f"{first['d_model']}d/{first['n_layers']}L/V={first['vocab_size']}, "
            if first.get("d_model") else "")
    ax.set_title(f"{size}batch {first.get('batch_size', '?')}, {first.get('device') or ''}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return True
