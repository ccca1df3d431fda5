"""The report: ``reports/report.md``, a self-contained ``reports/index.html`` and ``table1.csv``.

Everything is read back from the results database (one run id) and nothing else: the numbers
and sentences come from ``esolm.report_results``, the matplotlib figures from
``esolm.report_figures`` (embedded in the HTML as base64 PNGs); this module renders them, and
all generated text is HTML-escaped. The names of those two modules are importable from here.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from esolm.io import write_text_atomic
from esolm.report_figures import (
    FIGURES,
    TRAINING_LOSS_LABELS,
    fig_pareto,
    fig_ppl_vs_alpha,
    fig_search,
    fig_speed_quality,
    fig_speedup,
    fig_training,
)
from esolm.report_results import (
    HEADERS,
    ORDERING_HEADERS,
    PAPER_TABLE1,
    RESULTS_TABLE_SQL,
    RUNS_SQL,
    TABLE1_COLUMNS,
    TABLE1_METRICS,
    _fmt,
    display,
    judge_line,
    orderings,
    recipe_line,
    results_table,
    runs_table,
    seed_spread,
    settings_line,
    table1_rows,
    timing_line,
)
from esolm.store import DEFAULT_DB, query

__all__ = [
    "FIGURES",
    "HEADERS",
    "ORDERING_HEADERS",
    "PAPER_TABLE1",
    "RESULTS_TABLE_SQL",
    "RUNS_SQL",
    "TABLE1_COLUMNS",
    "TABLE1_METRICS",
    "TRAINING_LOSS_LABELS",
    "_fmt",
    "_html",
    "display",
    "fig_pareto",
    "fig_ppl_vs_alpha",
    "fig_search",
    "fig_speed_quality",
    "fig_speedup",
    "fig_training",
    "judge_line",
    "markdown_table",
    "orderings",
    "recipe_line",
    "results_table",
    "runs_table",
    "seed_spread",
    "settings_line",
    "table1_rows",
    "timing_line",
    "write_report",
    "write_table1",
]

INTRO = ("Test split; PPL = perplexity per token; exact = exact likelihood for a fixed order (left to right; "
         "sampler order = Binomial(L, alpha_0) random prefix then left to right); the unigram row is the "
         "baseline every model must beat.")


def markdown_table(cols: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table1(db: Path, rid: str, path: Path) -> int:
    """Table 1 of run ``rid`` (``table1_rows``) as CSV; returns the number of rows."""
    rows = table1_rows(db, rid)
    buf = io.StringIO()
    w = csv.DictWriter(buf, TABLE1_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return len(rows)


def _tables(db: Path, rid: str) -> list[tuple]:
    """The report's tables after the headline: (title, columns, rows[, a sentence under the title])."""
    spread = seed_spread(db, rid)
    return [*([spread] if spread else []),
            ("Which of the paper's orderings hold here (test split; margin = gap in nats over its "
             "standard error)", *orderings(db, rid)),
            ("The paper's Table 1 (test perplexity on LM1B and OpenWebText: the paper's numbers, not ours)",
             *PAPER_TABLE1),
            ("Runs in the database (test exact PPL, left to right)", *runs_table(db))]


def _markdown(rid: str, cols: list[str], rows: list[tuple], figs: list, samples: list, judged: str,
              tables: list, out: Path) -> str:
    md = [f"# esolm report\n\nRun `{rid}`. {INTRO} {judged}\n", markdown_table(cols, rows), ""]
    md += [f"## {t[0]}\n\n" + "".join(f"{note}\n\n" for note in t[3:]) + f"{markdown_table(t[1], t[2])}\n"
           for t in tables]
    md += [f"## {title}\n\n![{title}]({p.relative_to(out).as_posix()})\n" for title, p in figs]
    md += ["## Samples\n"] + [f"**{v}** #{i}\n\n> {t}\n" for v, i, t in samples]
    return "\n".join(md)


def write_report(db: Path = DEFAULT_DB, rid: str = "", out: Path = Path("reports"), n_samples: int = 2) -> dict:
    """Write report.md, index.html, table1.csv and the figures for run ``rid``, reading the
    database ``db`` only; returns the headline columns and rows and the figures' paths."""
    cols, rows = results_table(db, rid)
    figs = [(title, out / "figures" / name) for title, name, fn in FIGURES if fn(db, rid, out / "figures" / name)]
    _, samples = query("SELECT variant, sample_index, text FROM generations WHERE run_id = ? AND sample_index < ? "
                       "ORDER BY variant, sample_index", db, [rid, n_samples])
    judged = " ".join(filter(None, (judge_line(db, rid), timing_line(db, rid), recipe_line(db, rid),
                                    settings_line(db, rid))))
    shown_cols, shown = display(cols, rows)
    tables = _tables(db, rid)
    write_text_atomic(out / "report.md", _markdown(rid, shown_cols, shown, figs, samples, judged, tables, out))
    write_table1(db, rid, out / "table1.csv")
    write_text_atomic(out / "index.html", _html(rid, shown_cols, shown, figs, samples, judged, tables))
    return {"columns": cols, "rows": rows, "figures": [str(p) for _, p in figs]}


def _table_html(cols: list, rows: list[tuple]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def _code_spans(text: str) -> str:
    """Escaped text whose `backticked` spans are <code> (a sentence written for markdown)."""
    parts = html.escape(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: keep the text as it is
        return html.escape(text)
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}.wide{overflow-x:auto}"
         "table{border-collapse:collapse;font-size:.85em}"
         "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}img{max-width:100%}")


def _html(rid: str, cols: list[str], rows: list[tuple], figs: list, samples: list, judged: str = "",
          tables: list | None = None) -> str:
    esc = html.escape
    extra = "".join(f"<h2>{esc(t[0])}</h2>" + "".join(f"<p>{_code_spans(note)}</p>" for note in t[3:])
                    + _table_html(t[1], t[2]) for t in tables or [])
    images = "".join(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,"
                     f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in figs)
    texts = "".join(f"<h3>{esc(v)} #{i}</h3><blockquote>{esc(t)}</blockquote>" for v, i, t in samples)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>esolm report</title>"
            f"<style>{STYLE}</style></head><body><h1>esolm report</h1><p>Run <code>{esc(rid)}</code>, "
            f"test split. {esc(judged)}</p>{_table_html(cols, rows)}{extra}{images}"
            f"<h2>Samples</h2>{texts}</body></html>")
