"""Rows as text for a terminal (``esolm query``): one line per row, numbers right-aligned with one
precision per column, long text and JSON cut with an ellipsis to fit the width; headers are never
cut. Plain text, no markup: a cell such as ``[/Applause]`` prints as it is."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import shutil
from collections.abc import Sequence
from typing import Any

ELLIPSIS = "…"
GAP = "  "  # between columns
MIN_TEXT = 8  # a cut text column keeps at least this many characters (or its header's width)
MAX_DECIMALS = 6


def terminal_width(default: int = 120) -> int:
    """The terminal's columns; ``default`` when the output is piped (``COLUMNS`` wins)."""
    return shutil.get_terminal_size((default, 24)).columns


def _number(v: Any) -> bool:
    return isinstance(v, int | float | decimal.Decimal) and not isinstance(v, bool)


def _decimals(values: list[float]) -> int | None:
    """Fixed decimals for a column of floats: four significant digits of its median magnitude
    (integral floats: none); None: scientific notation (magnitudes beyond fixed notation)."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    if all(v == int(v) and v < 1e15 for v in finite):
        return 0
    nonzero = sorted(v for v in finite if v != 0)
    if not nonzero:
        return 1
    if nonzero[-1] >= 1e12 or nonzero[len(nonzero) // 2] < 10 ** -MAX_DECIMALS:
        return None
    digits = 3 - math.floor(math.log10(nonzero[len(nonzero) // 2]))
    return max(0, min(MAX_DECIMALS, digits))


def _format_number(v: Any, decimals: int | None) -> str:
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if decimals is None:
        return f"{v:.3e}"
    return f"{v:.{decimals}f}"


def _text(v: Any) -> str:
    """One line of text for a cell: NULL, true/false, compact JSON for lists and maps; line
    breaks and tabs shown as ⏎ and spaces."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list | tuple):
        v = json.dumps(v, default=str, ensure_ascii=False)
    elif isinstance(v, datetime.datetime):
        v = v.isoformat(sep=" ", timespec="seconds")
    elif isinstance(v, bytes):
        v = v.hex()
    return str(v).replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", " ")


def cells(cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[list[list[str]], list[bool]]:
    """Every cell as text, and which columns are numeric (right-aligned): a column whose values
    are all numbers (NULL aside); floats share one precision per column."""
    numeric, formats = [], []
    for j in range(len(cols)):
        values = [r[j] for r in rows if r[j] is not None]
        is_num = bool(values) and all(_number(v) for v in values)
        numeric.append(is_num)
        floats = [float(v) for v in values if is_num and not isinstance(v, int)]
        formats.append(_decimals(floats) if floats else 0)
    out = [[_format_number(v, formats[j]) if numeric[j] and v is not None else _text(v)
            for j, v in enumerate(r)] for r in rows]
    return out, numeric


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + ELLIPSIS


def _fit(widths: list[int], floors: list[int], shrinkable: list[bool], width: int) -> list[int]:
    """Column widths within ``width``: the widest shrinkable columns are cut to one common cap
    (never below their floor); the rest keep their width (the line may then stay longer)."""
    fixed = sum(w for w, s in zip(widths, shrinkable) if not s) + len(GAP) * (len(widths) - 1)
    if fixed + sum(w for w, s in zip(widths, shrinkable) if s) <= width:
        return widths

    def total(cap: int) -> int:
        return fixed + sum(min(w, max(cap, f)) for w, f, s in zip(widths, floors, shrinkable) if s)

    lo, hi = 0, max(widths)
    while lo < hi:  # the largest cap that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= width else (lo, mid - 1)
    return [min(w, max(lo, f)) if s else w for w, f, s in zip(widths, floors, shrinkable)]


def format_table(cols: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None,
                 full: bool = False) -> str:
    """The rows as aligned text: a header, a rule, one line per row and a row count. Text
    columns are cut with an ellipsis so that a line fits ``width`` (default: the terminal's,
    120 when piped) unless ``full``; headers and numbers are never cut."""
    width = terminal_width() if width is None else width
    text, numeric = cells(cols, rows)
    widths = [max([len(c)] + [len(r[j]) for r in text]) for j, c in enumerate(cols)]
    if not full:
        floors = [max(len(c), MIN_TEXT) for c in cols]
        widths = _fit(widths, floors, [not n for n in numeric], width)

    def line(values: Sequence[str]) -> str:
        parts = [_cut(v, w).rjust(w) if n else _cut(v, w).ljust(w) for v, w, n in zip(values, widths, numeric)]
        return GAP.join(parts).rstrip()

    out = [line(list(cols)), GAP.join("-" * w for w in widths)]
    out += [line(r) for r in text]
    out.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(out)
