"""The report: ``reports/report.md`` and a self-contained ``reports/index.html``.

Everything is read back from the results database (one run id), figures are drawn with
matplotlib, embedded in the HTML as base64 PNGs, and all generated text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from esolm.io import atomic_path, write_text_atomic
from esolm.store import DEFAULT_DB, query

HEADLINE_SQL = """
SELECT v.variant, v.family, v.alpha_0,
       max(CASE WHEN l.metric = 'exact_l2r_ppl' THEN l.value END) AS exact_l2r_ppl,
       max(CASE WHEN l.metric = 'exact_sampler_ppl' THEN l.value END) AS exact_sampler_ppl,
       max(CASE WHEN l.metric = 'nelbo_ppl' THEN l.value END) AS nelbo_ppl,
       max(CASE WHEN l.metric = 'nelbo_stderr' THEN l.value END) AS nelbo_stderr,
       max(CASE WHEN l.metric = 'iw4_ppl' THEN l.value END) AS iw4_ppl,
       max(CASE WHEN l.metric = 'bits_per_byte' THEN l.value END) AS bits_per_byte,
       any_value(s.gen_ppl) AS gen_ppl, any_value(s.entropy) AS entropy, any_value(s.nfe) AS nfe,
       any_value(s.seconds_per_sample) AS seconds_per_sample
FROM variants v
LEFT JOIN likelihood l ON l.run_id = v.run_id AND l.variant = v.variant AND l.split = ?
LEFT JOIN sampling s ON s.run_id = v.run_id AND s.variant = v.variant
WHERE v.run_id = ?
GROUP BY v.variant, v.family, v.alpha_0
ORDER BY v.family, v.alpha_0 DESC NULLS LAST, v.variant
"""


def headline(db: Path, rid: str, split: str = "test") -> tuple[list[str], list[tuple]]:
    return query(HEADLINE_SQL, db, [split, rid])


def _fmt(value: object) -> str:
    """Readable numbers: 3,570 not 3.57e+03; three significant digits below 100."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-" if math.isnan(value) else "inf"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


# headline column -> header with its unit (perplexities are per token; s = seconds)
HEADERS = {"alpha_0": "alpha_0", "exact_l2r_ppl": "exact PPL, left to right",
           "exact_sampler_ppl": "exact PPL, sampler order", "nelbo_ppl": "NELBO PPL (± s.e.)",
           "iw4_ppl": "IW bound PPL, K=4", "bits_per_byte": "bits/byte", "gen_ppl": "gen. PPL (judge)",
           "entropy": "entropy (nats)", "nfe": "NFE", "seconds_per_sample": "s/sample"}


def display(cols: list[str], rows: list[tuple]) -> tuple[list[str], list[tuple]]:
    """Headline rows for people: units in the headers, readable numbers, the NELBO with its
    standard error (in perplexity, by the delta method: PPL x s.e. in nats)."""
    shown = [c for c in cols if c != "nelbo_stderr"]
    out = []
    for row in rows:
        r = dict(zip(cols, row))
        cells = []
        for c in shown:
            if c == "nelbo_ppl" and r.get("nelbo_ppl") is not None and r.get("nelbo_stderr") is not None \
                    and not math.isnan(r["nelbo_stderr"]):
                cells.append(f"{_fmt(r['nelbo_ppl'])} ± {_fmt(r['nelbo_ppl'] * r['nelbo_stderr'])}")
            else:
                cells.append(_fmt(r[c]))
        out.append(tuple(cells))
    return [HEADERS.get(c, c) for c in shown], out


# The paper's Table 1 (test perplexity; 170M-parameter models; LM1B L=128 1M steps, OWT L=1024
# 250k steps): method.md section 6. Labelled as the paper's, never as ours.
PAPER_TABLE1 = (["model", "LM1B exact", "LM1B NELBO", "OWT exact", "OWT NELBO"], [
    ("AR", "21.86", "-", "17.78", "-"), ("MDLM", "26.82", "31.78", "-", "25.19"),
    ("BD3-LM L'=4", "-", "28.23", "-", "20.96"), ("Eso-LM alpha_0=1", "31.65", "36.12", "29.31", "30.06"),
    ("Eso-LM alpha_0=0.5", "28.07", "32.53", "26.61", "27.94"),
    ("Eso-LM alpha_0=0.25", "24.80", "29.23", "23.15", "24.71"),
    ("Eso-LM alpha_0=0.125", "23.02", "26.29", "20.53", "21.92")])


RUNS_SQL = """
SELECT r.run_id, r.label, strftime(r.ingested_at, '%Y-%m-%d %H:%M') AS ingested, l.variant, l.value
FROM runs r JOIN likelihood l ON l.run_id = r.run_id
WHERE l.split = 'test' AND l.metric = 'exact_l2r_ppl'
ORDER BY r.ingested_at, l.variant
"""


TABLE1_METRICS = ("exact_l2r", "exact_sampler", "nelbo")  # then every iwK (the paper's law)


def table1_rows(db: Path, rid: str) -> list[dict]:
    """Table 1 of this run, long format: variant, family, alpha_0, split, metric, value, stderr
    (perplexities; the standard error by the delta method, PPL x s.e. in nats per token)."""
    _, rows = query("SELECT l.variant, v.family, v.alpha_0, l.split, l.metric, l.value FROM likelihood l "
                    "JOIN variants v ON v.run_id = l.run_id AND v.variant = l.variant WHERE l.run_id = ? "
                    "ORDER BY v.family, v.alpha_0 DESC NULLS LAST, l.variant, l.split, l.metric", db, [rid])
    values = {(r[0], r[3], r[4]): r[5] for r in rows}
    out = []
    for variant, family, alpha_0, split, metric, value in rows:
        if not metric.endswith("_ppl"):
            continue
        base = metric[: -len("_ppl")]
        if base not in TABLE1_METRICS and not (base.startswith("iw") and base[2:].isdigit()):
            continue
        se = values.get((variant, split, f"{base}_stderr"))
        out.append({"variant": variant, "family": family, "alpha_0": alpha_0, "split": split, "metric": metric,
                    "value": value, "stderr": value * se if se is not None and not math.isnan(se) else None})
    return out


def write_table1(db: Path, rid: str, path: Path) -> int:
    import csv
    import io

    rows = table1_rows(db, rid)
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["variant", "family", "alpha_0", "split", "metric", "value", "stderr"])
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return len(rows)


ORDERING_HEADERS = ["the paper's ordering", "metric", "values (PPL)", "margin (s.e.)", "holds here"]


def orderings(db: Path, rid: str, split: str = "test") -> tuple[list[str], list[tuple]]:
    """Which of the paper's Table 1 orderings hold in this run, each with its margin in
    standard errors: (1) AR < Eso-LM (B) with alpha_0 ascending, (2) exact (left to right and in
    the sampler's order) <= NELBO per diffusion model, (3) MDLM < Eso-LM (B) alpha_0 = 1. The
    margin is the difference of the log perplexities (nats/token) over the standard error of
    that difference, the two standard errors combined as if independent (the same test rows score every model, so this
    is conservative); positive means the ordering holds, above 2 it holds clearly."""
    from esolm.families import AR, ESO_B, MDLM  # the paper's claims name these families

    rows = [r for r in table1_rows(db, rid) if r["split"] == split]
    info = {r["variant"]: (r["family"], r["alpha_0"]) for r in rows}
    val = {(r["variant"], r["metric"]): (r["value"], r["stderr"]) for r in rows}

    def get(variant: str, base: str) -> tuple[float, float] | None:
        """(perplexity, standard error in nats) of one metric; table1_rows holds it in PPL."""
        if info[variant][0] == AR.name and base in ("exact_sampler", "nelbo"):
            base = "exact_l2r"  # AR: one order, and its NELBO is its exact likelihood
        ppl, se = val.get((variant, f"{base}_ppl"), (None, None))
        if ppl is None or math.isnan(ppl):
            return None
        return ppl, (0.0 if se is None else se / ppl)

    def row(claim: str, lo: str, hi: str, base: str, hi_base: str | None = None) -> tuple | None:
        a, b = get(lo, base), get(hi, hi_base or base)
        if a is None or b is None:
            return None
        gap = math.log(b[0]) - math.log(a[0])
        se = math.hypot(a[1], b[1])
        margin = gap / se if se > 0 else (math.inf if gap > 0 else -math.inf if gap < 0 else 0.0)
        verdict = "yes" if margin > 2 else "yes, within noise" if margin > 0 else \
            "no, within noise" if margin > -2 else "no"
        label = base.replace("_", " ") + ("" if hi_base is None else f" vs {hi_base}")
        return (claim, label, f"{a[0]:.1f} vs {b[0]:.1f}", f"{margin:+.1f}", verdict)

    out = []
    chain = [v for v in info if info[v][0] == AR.name] + sorted(
        (v for v in info if info[v][0] == ESO_B.name and info[v][1] is not None), key=lambda v: info[v][1])
    for lo, hi in zip(chain, chain[1:]):
        for base in ("exact_sampler", "nelbo"):
            out.append(row(f"{lo} < {hi}", lo, hi, base))
    for v in sorted(info):
        if info[v][0] != AR.name:  # both orders: the paper's "exact" column does not name its order
            out += [row(f"{v}: exact <= NELBO", v, v, base, "nelbo") for base in ("exact_l2r", "exact_sampler")]
    ones = [v for v in info if info[v][0] == ESO_B.name and info[v][1] == 1.0]
    for m in (v for v in info if info[v][0] == MDLM.name):
        for e in ones:
            for base in ("exact_sampler", "nelbo"):
                out.append(row(f"{m} < {e}", m, e, base))
    return ORDERING_HEADERS, [r for r in out if r is not None]


def runs_table(db: Path) -> tuple[list[str], list[tuple]]:
    """Every run in the database as a row (its test exact perplexity per variant): the
    comparison of experiments, straight from DuckDB."""
    _, rows = query(RUNS_SQL, db)
    variants = sorted({r[3] for r in rows})
    by_run: dict[str, dict] = {}
    for rid, label, when, variant, value in rows:
        by_run.setdefault(rid, {"run": rid, "label": label, "ingested": when})[variant] = value
    cols = ["run", "label", "ingested", *variants]
    return cols, [tuple(_fmt(d.get(c)) if c in variants else d[c] for c in cols) for d in by_run.values()]


def markdown_table(cols: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_ppl_vs_alpha(db: Path, rid: str, path: Path) -> bool:
    """Test perplexity against alpha_0: a curve per family whose alpha_0 is free (Eso-LMs), a
    line per fixed-alpha_0 baseline (AR exact; MDLM, BD3-LM NELBO) and the unigram baseline."""
    from esolm.families import FAMILIES

    cols, rows = headline(db, rid)
    data = [dict(zip(cols, r)) for r in rows]
    known = [d for d in data if d["family"] in FAMILIES]
    free = [f for f in FAMILIES.values() if f.fixed_alpha_0 is None]
    curves = {f.name: sorted((d for d in known if d["family"] == f.name and d["exact_l2r_ppl"]),
                             key=lambda d: d["alpha_0"]) for f in free}
    if not any(curves.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for f in free:
        pts = curves[f.name]
        if pts:
            ax.plot([d["alpha_0"] for d in pts], [d["exact_sampler_ppl"] or d["exact_l2r_ppl"] for d in pts], "o-",
                    color=f.color, label=f"{f.label} exact (sampler order)")
            ax.plot([d["alpha_0"] for d in pts], [d["nelbo_ppl"] for d in pts], "s--", color=f.color, alpha=0.6,
                    label=f"{f.label} NELBO")
    for d in data:
        spec = FAMILIES.get(d["family"])
        if d["family"] == "unigram" or (spec is not None and spec.fixed_alpha_0 is not None):
            exact = spec is None or spec.autoregressive  # the unigram baseline is exact too
            value = d["exact_l2r_ppl"] if exact else d["nelbo_ppl"]
            color = "tab:gray" if spec is None else spec.color
            ax.axhline(value, ls=":", lw=1, color=color, label=f"{d['variant']} ({'exact' if exact else 'NELBO'})")
    ax.set_xlabel("alpha_0 (fraction generated by diffusion)")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def fig_speed_quality(db: Path, rid: str, path: Path) -> bool:
    _, rows = query("SELECT variant, seconds_per_sample, gen_ppl, entropy FROM sampling WHERE run_id = ?",
                    db, [rid])
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for variant, sec, ppl, ent in rows:
        ax.scatter(sec, ppl)
        ax.annotate(f"{variant} (H={ent:.2f})", (sec, ppl), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("sampling time per sample (s)")
    ax.set_ylabel("generative perplexity (under the judge)")
    return _save(plt, fig, path)


def fig_pareto(db: Path, rid: str, path: Path, search: Path = Path("reports/search/pareto.json")) -> bool:
    """The paper's speed-quality figure: generative perplexity against seconds per sample and
    against NFE, one curve per variant over the grid of T (log axes), with the searched
    schedule's Pareto front on the time axis."""
    _, rows = query("SELECT variant, family, nfe, seconds_per_sample, gen_ppl FROM curves WHERE run_id = ? "
                    "ORDER BY variant, nfe", db, [rid])
    if not rows:
        return False
    plt = _plt()
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for variant in sorted({r[0] for r in rows}):
        pts = [r for r in rows if r[0] == variant]
        style = "s" if len(pts) == 1 else "o-"
        ax_t.plot([p[3] for p in pts], [p[4] for p in pts], style, label=f"{variant} ({pts[0][1]})", ms=4)
        ax_n.plot([p[2] for p in pts], [p[4] for p in pts], style, ms=4)
    if search.exists():
        front = json.loads(search.read_text()).get("front") or []
        if front:
            ax_t.plot([p["seconds"] for p in front], [p["gen_ppl"] for p in front], "k--", lw=1,
                      label="searched schedule (front)")
    for ax, label in ((ax_t, "seconds per sample"), (ax_n, "NFE (forward passes)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
    ax_t.set_ylabel("generative perplexity (under the judge)")
    ax_t.legend(fontsize=6)
    return _save(plt, fig, path)


def fig_speedup(db: Path, rid: str, path: Path) -> bool:
    from esolm.bench import plot_bench

    cols, rows = query("SELECT family, length, nfe_budget, median_s, batch_size, device, d_model, "
                       "n_layers, vocab_size FROM throughput WHERE run_id = ?", db, [rid])
    return plot_bench([dict(zip(cols, r)) for r in rows], str(path))


def fig_training(db: Path, rid: str, path: Path) -> bool:
    """Training loss per step, one panel per objective: the NELBO and, when ``train.objective``
    is ``low_var``, the alpha_0 = 1 models' low_var loss (weight 1 per masked token: a different
    scale, not a bound), so that no curve is read on another's axis. The steps of a masking
    warm-up (``train.mask_warmup_steps``: fewer masked tokens, so a lower loss) are shaded."""
    _, rows = query("SELECT t.variant, t.step, t.loss, coalesce(v.objective, 'nelbo'), "
                    "coalesce(t.t_max, 1.0) FROM training t "
                    "LEFT JOIN variants v ON v.run_id = t.run_id AND v.variant = t.variant "
                    "WHERE t.run_id = ? ORDER BY t.variant, t.step", db, [rid])
    if not rows:
        return False
    plt = _plt()
    objectives = sorted({r[3] for r in rows}, key=lambda o: o != "nelbo")  # the NELBO first
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.5 * len(objectives), 3.6), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        for variant in sorted({r[0] for r in rows if r[3] == objective}):
            pts = [(s, v) for n, s, v, _, _ in rows if n == variant]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant)
        warm = [r[1] for r in rows if r[3] == objective and r[4] < 1.0]
        if warm:
            ax.axvspan(0, max(warm), color="0.85", zorder=0, label="masking warm-up (t_max < 1)")
        ax.set_xlabel("step")
        ax.set_ylabel(TRAINING_LOSS_LABELS.get(objective, f"training loss, {objective} (nats/token)"))
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


TRAINING_LOSS_LABELS = {"nelbo": "training NELBO (nats/token)",
                        "low_var": "training loss, low_var (nats/token; not a bound)"}


def _save(plt, fig, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


FIGURES = [("Perplexity vs alpha_0", "ppl_vs_alpha.png", fig_ppl_vs_alpha),
           ("Speed and quality of sampling", "speed_quality.png", fig_speed_quality),
           ("Generative perplexity vs sampling time and NFE over a grid of T (the paper's Pareto figure)",
            "pareto.png", fig_pareto),
           ("Sampling speedup vs sequence length", "speedup.png", fig_speedup),
           ("Training curves", "training.png", fig_training)]


def write_report(db: Path = DEFAULT_DB, rid: str = "", out: Path = Path("reports"), n_samples: int = 2) -> dict:
    """Write report.md, index.html and the figures for run ``rid``; returns the headline rows."""
    cols, rows = headline(db, rid)
    figs = []
    for title, name, fn in FIGURES:
        if fn(db, rid, out / "figures" / name):
            figs.append((title, out / "figures" / name))
    search_fig = out / "search" / "pareto.png"
    if search_fig.exists():  # copied beside the others: every figure the report names is committed
        copy = out / "figures" / "search_pareto.png"
        with atomic_path(copy) as tmp:
            tmp.write_bytes(search_fig.read_bytes())
        figs.append(("Schedule search: Pareto front vs the default schedule", copy))
    _, samples = query("SELECT variant, sample_index, text FROM generations WHERE run_id = ? AND sample_index < ? "
                       "ORDER BY variant, sample_index", db, [rid, n_samples])
    judged = " ".join(filter(None, (judge_line(db, rid), recipe_line(db, rid))))
    shown_cols, shown = display(cols, rows)
    tables = [("Which of the paper's orderings hold here (test split; margin = gap in nats over its "
               "standard error)", *orderings(db, rid)),
              ("The paper's Table 1 (test perplexity on LM1B and OpenWebText: the paper's numbers, "
               "not ours)", *PAPER_TABLE1), ("Runs in the database (test exact PPL, left to right)",
                                               *runs_table(db))]
    md = [(f"# esolm report\n\nRun `{rid}`. Test split; PPL = perplexity per token; exact = exact "
           "likelihood for a fixed order (left to right; sampler order = Binomial(L, alpha_0) random "
           "prefix then left to right); the unigram row is the baseline every model must beat. "
           f"{judged}\n"), markdown_table(shown_cols, shown), ""]
    md += [f"## {title}\n\n{markdown_table(c, r)}\n" for title, c, r in tables]
    md += [f"## {title}\n\n![{title}]({p.relative_to(out).as_posix()})\n" for title, p in figs]
    md += ["## Samples\n"] + [f"**{v}** #{i}\n\n> {t}\n" for v, i, t in samples]
    write_text_atomic(out / "report.md", "\n".join(md))
    write_table1(db, rid, out / "table1.csv")
    write_text_atomic(out / "index.html", _html(rid, shown_cols, shown, figs, samples, judged, tables))
    return {"columns": cols, "rows": rows, "figures": [str(p) for _, p in figs]}


def recipe_line(db: Path, rid: str, runs: Path = Path("runs")) -> str:
    """How the contestants were trained (init, objective, masking warm-up), from their train.json."""
    _, names = query("SELECT variant FROM variants WHERE run_id = ? AND family != 'unigram' ORDER BY variant",
                     db, [rid])
    inits, objectives, warmups = set(), {}, {}
    for (name,) in names:
        path = runs / str(name) / "train.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        inits.add(s.get("init", "unrecorded"))
        objectives.setdefault(s.get("objective", "nelbo"), []).append(name)
        if s.get("mask_warmup"):
            w = s["mask_warmup"]
            warmups.setdefault((w["start"], w["steps"]), []).append(name)
    if not inits:
        return ""
    obj = "; ".join(f"{o} ({', '.join(v)})" for o, v in sorted(objectives.items()))
    warm = "; ".join(f"the largest diffusion time rose from {a:g} to 1 over the first {n} steps "
                     f"({', '.join(v)})" for (a, n), v in sorted(warmups.items()))
    return (f"Training: init {' / '.join(sorted(inits))}; objective {obj}; masking warm-up: "
            f"{warm or 'none'}. Validation and every likelihood here draw t over [eps, 1].")


def judge_line(db: Path, rid: str, runs: Path = Path("runs")) -> str:
    """Who scored the generative perplexity, and (for an esolm judge) its own test perplexity."""
    _, names = query("SELECT DISTINCT judge FROM sampling WHERE run_id = ? ORDER BY judge", db, [rid])
    parts = []
    for (name,) in names:
        like = runs / str(name) / "likelihood.json"
        ppl = json.loads(like.read_text()).get("test", {}).get("exact_l2r_ppl") if like.exists() else None
        parts.append(f"{name} (an AR model of its own stage, never a contestant; its test perplexity "
                     f"{ppl:.1f})" if ppl is not None else str(name))
    return f"Generative perplexity is judged by {', '.join(parts)}." if parts else ""


def _table_html(cols: list, rows: list[tuple]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def _html(rid: str, cols: list[str], rows: list[tuple], figs: list, samples: list, judged: str = "",
          tables: list | None = None) -> str:
    esc = html.escape
    extra = "".join(f"<h2>{esc(t)}</h2>{_table_html(c, r)}" for t, c, r in tables or [])
    images = "".join(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,"
                     f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in figs)
    texts = "".join(f"<h3>{esc(v)} #{i}</h3><blockquote>{esc(t)}</blockquote>" for v, i, t in samples)
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}.wide{overflow-x:auto}"
             "table{border-collapse:collapse;font-size:.85em}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>esolm report</title>"
            f"<style>{style}</style></head><body><h1>esolm report</h1><p>Run <code>{esc(rid)}</code>, "
            f"test split. {esc(judged)}</p>{_table_html(cols, rows)}{extra}{images}"
            f"<h2>Samples</h2>{texts}</body></html>")


