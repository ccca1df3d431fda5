"""The report's figures: matplotlib PNGs drawn from the results database, one run id.

Each ``fig_*(db, rid, path)`` reads DuckDB only and returns False (drawing nothing) when the run
has no rows for it; ``FIGURES`` lists them in the report's order (title, file name, function).
Every variant has one colour in every figure (``esolm.plots.variant_color``: its family's hue,
shaded by alpha_0); perplexities carry their standard errors as error bars where the database has
them; every panel has axis labels and a legend, and nothing is cut off (``bbox_inches='tight'``).
"""

from __future__ import annotations

import math
from pathlib import Path

from esolm.families import FAMILIES
from esolm.plots import OTHER_COLOR, legend_outside, log_axis, save_figure, speedup, variant_color
from esolm.report_results import table1_rows
from esolm.store import query


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _colors(db: Path, rid: str) -> dict[str, str]:
    """variant -> its colour (``variant_color`` of its family and alpha_0), for every variant of the run."""
    _, rows = query("SELECT variant, family, alpha_0 FROM variants WHERE run_id = ?", db, [rid])
    return {v: variant_color(f, a) for v, f, a in rows}


def _label_points(ax, xs, ys, labels, color, fontsize: float = 6) -> None:
    """A small label (T, NFE) beside each point, in the point's colour; above and below the
    points in turn, so that neighbours' labels do not print over each other."""
    for i, (x, y, label) in enumerate(zip(xs, ys, labels)):
        if label is not None:
            ax.annotate(str(label), (x, y), xytext=(3, 3 if i % 2 == 0 else -3), textcoords="offset points",
                        fontsize=fontsize, color=color, va="bottom" if i % 2 == 0 else "top")


# ----------------------------------------------------------------------------- perplexity vs alpha_0

FAMILY_OFFSET = 0.07  # log2 units between the families' markers at one alpha_0 (Eso-LM (A) beside (B))
METRIC_OFFSET = 0.025  # log2 units between a variant's exact and NELBO markers
UNIGRAM_OFF_AXIS = 1.6  # the unigram is annotated above the axis when this many times the highest value


def _ppl(val: dict, variant: str, *bases: str) -> tuple[float, float] | None:
    """(perplexity, standard error in perplexity; 0 when unknown) of the first of ``bases`` measured."""
    for base in bases:
        ppl, se = val.get((variant, f"{base}_ppl"), (None, None))
        if ppl is not None and not math.isnan(ppl):
            return ppl, (se or 0.0)
    return None


def fig_ppl_vs_alpha(db: Path, rid: str, path: Path) -> bool:
    """Test perplexity against alpha_0 (log axes): per variant of a family whose alpha_0 is free
    (Eso-LMs) the exact likelihood (sampler order; left to right where that is all there is) and
    the NELBO (on the exact metrics' tokens), each with its standard error (delta method: PPL x
    s.e. in nats), the families' markers offset slightly so that none hides another; a line with
    a band of one s.e. per fixed-alpha_0 baseline (AR exact; MDLM, BD3-LM NELBO) and the unigram
    (written above the axis when it would squash it)."""
    rows = [r for r in table1_rows(db, rid) if r["split"] == "test"]
    val = {(r["variant"], r["metric"]): (r["value"], r["stderr"]) for r in rows}
    info = {r["variant"]: (r["family"], r["alpha_0"]) for r in rows}
    free = [f for f in FAMILIES.values() if f.fixed_alpha_0 is None]
    points = {f.name: sorted(((v, a) for v, (fam, a) in info.items() if fam == f.name and a is not None and a > 0
                              and _ppl(val, v, "exact_sampler", "exact_l2r")), key=lambda p: p[1]) for f in free}
    if not any(points.values()):
        return False
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    shown: list[float] = []
    families = [f for f in free if points[f.name]]
    for i, f in enumerate(families):
        shift = FAMILY_OFFSET * (i - (len(families) - 1) / 2)
        for metric, bases, dm, style in (("exact", ("exact_sampler", "exact_l2r"), -METRIC_OFFSET, "-"),
                                         ("NELBO", ("nelbo_paired", "nelbo"), METRIC_OFFSET, "--")):
            pts = [(a * 2 ** (shift + dm), _ppl(val, v, *bases), v) for v, a in points[f.name]]
            pts = [(x, p, v) for x, p, v in pts if p is not None]
            ax.plot([x for x, _, _ in pts], [p[0] for _, p, _ in pts], style, color=f.color, lw=1, alpha=0.5)
            for x, (ppl, se), v in pts:
                color = variant_color(f.name, info[v][1])
                ax.errorbar([x], [ppl], yerr=[se], fmt="o" if metric == "exact" else "s", color=color, ms=5,
                            mfc=color if metric == "exact" else "white", capsize=2, lw=1,
                            label=f"{v} ({f.label})" if metric == "exact" else "_nolegend_")
                shown += [ppl - se, ppl + se]
    baselines = [(v, fam, a) for v, (fam, a) in info.items() if fam not in points]
    unigram = []
    for v, fam, _ in sorted(baselines):
        record = FAMILIES.get(fam)
        exact = record is None or record.autoregressive  # the unigram baseline is exact too
        got = _ppl(val, v, "exact_l2r") if exact else _ppl(val, v, "nelbo_paired", "nelbo")
        if got is None:
            continue
        if record is None:
            unigram.append((v, got[0]))
            continue
        color = variant_color(fam, None)
        ax.axhline(got[0], ls=":", lw=1.2, color=color,
                   label=f"{v} ({'exact' if exact else 'NELBO'}{f' ± {got[1]:.1f}' if got[1] else ''})")
        if got[1]:
            ax.axhspan(got[0] - got[1], got[0] + got[1], color=color, alpha=0.12, lw=0)
        shown += [got[0] - got[1], got[0] + got[1]]
    top = max(shown) if shown else 1.0
    for v, ppl in unigram:
        if ppl > UNIGRAM_OFF_AXIS * top:
            ax.annotate(f"{v} (exact): {ppl:.0f}, above the axis", xy=(0.01, 0.985), xycoords="axes fraction",
                        ha="left", va="top", fontsize=7, color=OTHER_COLOR)
        else:
            ax.axhline(ppl, ls=":", lw=1.2, color=OTHER_COLOR, label=f"{v} (exact)")
            shown.append(ppl)
    alphas = sorted({a for pts in points.values() for _, a in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    ax.minorticks_off()
    ax.set_xlim(min(alphas) / 2 ** 0.3, max(alphas) * 2 ** 0.3)
    log_axis(ax, "y", [s for s in shown if s > 0])
    ax.set_ylim(min(s for s in shown if s > 0) / 1.1, max(shown) * 1.12)
    ax.set_xlabel("alpha_0 (fraction generated by diffusion; log scale)")
    ax.set_ylabel("test perplexity (± 1 s.e.)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", marker="o", ls="-", label="exact (sampler order)"),
                Line2D([], [], color="0.3", marker="s", mfc="white", ls="--", label="NELBO (exact's tokens)")]
    legend_outside(ax, handles=handles)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- sampling

GEN_PPL_SE_SQL = """
SELECT s.variant, s.family, v.alpha_0, s.seconds_per_sample, s.gen_ppl, s.entropy, s.nfe,
       stddev_samp(g.judge_nll) / sqrt(count(g.judge_nll)) AS nll_se
FROM sampling s
LEFT JOIN variants v ON v.run_id = s.run_id AND v.variant = s.variant
LEFT JOIN generations g ON g.run_id = s.run_id AND g.variant = s.variant
WHERE s.run_id = ?
GROUP BY ALL ORDER BY s.variant
"""


def fig_speed_quality(db: Path, rid: str, path: Path) -> bool:
    """Generative perplexity against seconds per sample, one point per variant in its colour,
    labelled with its NFE; the error bar is the standard error across the judged samples (PPL x
    s.e. of their per-sample NLL in nats), where the database holds the samples."""
    _, rows = query(GEN_PPL_SE_SQL, db, [rid])
    rows = [r for r in rows if r[3] is not None and r[4] is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for variant, family, alpha_0, sec, ppl, ent, nfe, nll_se in rows:
        color = variant_color(family, alpha_0)
        se = ppl * nll_se if nll_se is not None and not math.isnan(nll_se) else 0.0
        ax.errorbar([sec], [ppl], yerr=[se], fmt="o", color=color, capsize=2, ms=6,
                    label=f"{variant} (entropy {ent:.2f})" if ent is not None else variant)
        _label_points(ax, [sec], [ppl], [f"NFE {nfe}" if nfe is not None else None], color, fontsize=7)
    log_axis(ax, "x", [r[3] for r in rows])
    log_axis(ax, "y", [r[4] for r in rows])
    ax.margins(x=0.12, y=0.08)  # room for the NFE labels inside the axes
    ax.set_xlabel("sampling time per sample (s)")
    ax.set_ylabel("generative perplexity (judge; ± 1 s.e.)")
    legend_outside(ax)
    return _save(plt, fig, path)


def _search_points(db: Path, rid: str, kind: str) -> list[tuple]:
    """(seconds, gen_ppl, steps, nfe) of the schedule search's ``front`` or ``default`` points, in order."""
    _, rows = query("SELECT seconds, gen_ppl, steps, nfe FROM search_points WHERE run_id = ? AND kind = ? "
                    "ORDER BY point", db, [rid, kind])
    return rows


def fig_pareto(db: Path, rid: str, path: Path) -> bool:
    """The paper's speed-quality figure: generative perplexity against seconds per sample and
    against NFE, one curve per variant (in its colour) over the grid of T, each point labelled
    with its T and each curve drawn in the order of its x axis (log axes), with the searched
    schedule's Pareto front on the time axis."""
    _, rows = query("SELECT c.variant, c.family, c.nfe, c.seconds_per_sample, c.gen_ppl, c.steps, "
                    "coalesce(c.alpha_0, v.alpha_0) FROM curves c LEFT JOIN variants v "
                    "ON v.run_id = c.run_id AND v.variant = c.variant WHERE c.run_id = ? "
                    "ORDER BY c.variant, c.nfe", db, [rid])
    if not rows:
        return False
    plt = _plt()
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for variant in sorted({r[0] for r in rows}):
        pts = [r for r in rows if r[0] == variant]
        color = variant_color(pts[0][1], pts[0][6])
        style = "s" if len(pts) == 1 else "o-"
        for ax, x in ((ax_t, 3), (ax_n, 2)):
            mine = sorted(pts, key=lambda p: (p[x], p[4]))
            ax.plot([p[x] for p in mine], [p[4] for p in mine], style, color=color, ms=4,
                    label=f"{variant} ({FAMILIES[pts[0][1]].label if pts[0][1] in FAMILIES else pts[0][1]})")
            _label_points(ax, [p[x] for p in mine], [p[4] for p in mine],
                          [p[5] if p[5] is not None and p[5] > 0 else None for p in mine], color)
    front = _search_points(db, rid, "front")
    if front:
        front = sorted(front, key=lambda p: p[0])
        ax_t.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="searched schedule (front)")
    log_axis(ax_t, "x", [r[3] for r in rows] + [p[0] for p in front])
    log_axis(ax_n, "x", [r[2] for r in rows], base=2)
    log_axis(ax_t, "y", [r[4] for r in rows] + [p[1] for p in front])
    ax_t.set_xlabel("seconds per sample")
    ax_n.set_xlabel("NFE (forward passes)")
    for ax in (ax_t, ax_n):
        ax.set_ylabel("generative perplexity (judge)")
        ax.tick_params(labelleft=True)
        ax.legend(fontsize=6, title="numbers at points: T (steps)", title_fontsize=6)
    return _save(plt, fig, path)


def fig_search(db: Path, rid: str, path: Path) -> bool:
    """The schedule search of one model file, named in the title: every trial (in the searched
    variant's colour; grey: below the entropy floor, when there are any), the Pareto front of the
    feasible ones and the default schedule over the grid of T, labelled with T (the search
    stage's pareto.png, redrawn from the database)."""
    _, trials = query("SELECT seconds, gen_ppl, feasible, variant FROM search_trials WHERE run_id = ? "
                      "AND gen_ppl IS NOT NULL ORDER BY variant, trial", db, [rid])
    front, default = _search_points(db, rid, "front"), _search_points(db, rid, "default")
    if not trials and not front:
        return False
    _, searched = query("SELECT DISTINCT p.variant, v.family, v.alpha_0 FROM search_points p LEFT JOIN variants v "
                        "ON v.run_id = p.run_id AND v.variant = p.variant WHERE p.run_id = ? "
                        "UNION SELECT DISTINCT t.variant, v.family, v.alpha_0 FROM search_trials t LEFT JOIN "
                        "variants v ON v.run_id = t.run_id AND v.variant = t.variant WHERE t.run_id = ? "
                        "ORDER BY 1", db, [rid, rid])
    plt = _plt()
    from matplotlib.lines import Line2D

    color = variant_color(searched[0][1], searched[0][2]) if len(searched) == 1 else "tab:blue"
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.scatter([t[0] for t in trials], [t[1] for t in trials], s=16, alpha=0.55,
               c=[color if t[2] else OTHER_COLOR for t in trials], label="_trials")
    front = sorted(front, key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color=color, mec="k", label="Pareto front")
    _label_points(ax, [p[0] for p in front], [p[1] for p in front],
                  [f"NFE {p[3]:g}" if p[3] is not None else None for p in front], color)
    if default:
        default = sorted(default, key=lambda p: p[0])
        ax.plot([p[0] for p in default], [p[1] for p in default], "s--", color="k", ms=5,
                label="default schedule (T grid)")
        _label_points(ax, [p[0] for p in default], [p[1] for p in default],
                      [f"T={p[2]}" if p[2] is not None else None for p in default], "k")
    handles, _ = ax.get_legend_handles_labels()
    handles.insert(0, Line2D([], [], ls="", marker="o", color=color, alpha=0.55, label="trials (feasible)"))
    if any(not t[2] for t in trials):
        handles.insert(1, Line2D([], [], ls="", marker="o", color=OTHER_COLOR, alpha=0.55,
                                 label="trials below the entropy floor"))
    log_axis(ax, "x", [t[0] for t in trials] + [p[0] for p in front + default])
    log_axis(ax, "y", [t[1] for t in trials] + [p[1] for p in front + default])
    names = ", ".join(f"{v} ({FAMILIES[f].label}, alpha_0 = {a:g})" if f in FAMILIES and a is not None else v
                      for v, f, a in searched)
    ax.set_title(f"schedule search on {names}", fontsize=9)
    ax.set_xlabel("sampling time per sample (s)")
    ax.set_ylabel("generative perplexity (judge)")
    legend_outside(ax, handles=handles)
    return _save(plt, fig, path)


SPEEDUP_SQL = ("SELECT t.variant, t.family, t.length, t.median_s, t.batch_size, t.device, t.d_model, t.n_layers, "
               "t.vocab_size FROM throughput t WHERE t.run_id = ? AND t.nfe_budget = 'L' AND t.batch_size = "
               "(SELECT min(batch_size) FROM throughput WHERE run_id = ? AND nfe_budget = 'L') "
               "ORDER BY t.variant, t.length")


def fig_speedup(db: Path, rid: str, path: Path) -> bool:
    """Speedup of Eso-LM (B) over each family against sequence length (NFE = L rows of the
    smallest batch size timed; the bench stage's bench.png, redrawn from the database)."""
    cols, rows = query(SPEEDUP_SQL, db, [rid, rid])
    return speedup([dict(zip(cols, r)) for r in rows], path)


TRAINING_LOSS_LABELS = {"nelbo": "training NELBO (nats/token)",
                        "low_var": "training loss, low_var (nats/token; not a bound)"}


def fig_training(db: Path, rid: str, path: Path) -> bool:
    """Training loss per step, one panel per objective, each variant in its colour: the NELBO
    and, when ``train.objective`` is ``low_var``, the alpha_0 = 1 models' low_var loss (weight 1
    per masked token: a different scale, not a bound), so that no curve is read on another's
    axis. Beside them, each variant's validation NELBO at the end of training (validation is
    always the NELBO, whatever the objective; the database keeps its final value, not a curve)
    as a diamond on the NELBO panel. The steps of a masking warm-up (``train.mask_warmup_steps``:
    fewer masked tokens, so a lower loss) are shaded."""
    _, rows = query("SELECT t.variant, t.step, t.loss, coalesce(v.objective, 'nelbo'), "
                    "coalesce(t.t_max, 1.0) FROM training t "
                    "LEFT JOIN variants v ON v.run_id = t.run_id AND v.variant = t.variant "
                    "WHERE t.run_id = ? ORDER BY t.variant, t.step", db, [rid])
    if not rows:
        return False
    _, valid = query("SELECT t.variant, max(t.step), any_value(v.final_valid_loss) FROM training t "
                     "JOIN variants v ON v.run_id = t.run_id AND v.variant = t.variant "
                     "WHERE t.run_id = ? AND v.final_valid_loss IS NOT NULL GROUP BY t.variant ORDER BY 1",
                     db, [rid])
    colors = _colors(db, rid)
    plt = _plt()
    from matplotlib.lines import Line2D

    objectives = sorted({r[3] for r in rows}, key=lambda o: o != "nelbo")  # the NELBO first
    fig, axes = plt.subplots(1, len(objectives), figsize=(6.2 * len(objectives), 4.2), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        mine = sorted({r[0] for r in rows if r[3] == objective})
        for variant in mine:
            pts = [(s, v) for n, s, v, _, _ in rows if n == variant]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors.get(variant, OTHER_COLOR), label=variant)
        warm = [r[1] for r in rows if r[3] == objective and r[4] < 1.0]
        if warm:
            ax.axvspan(0, max(warm), color="0.85", zorder=0, label="masking warm-up (t_max < 1)")
        handles, _ = ax.get_legend_handles_labels()
        if objective == "nelbo" and valid:
            span = max(r[1] for r in rows)
            for i, (variant, step, loss) in enumerate(valid):  # side by side, so none hides another
                ax.scatter([step + 0.012 * span * (i + 1)], [loss], marker="D", s=36,
                           color=colors.get(variant, OTHER_COLOR),
                           edgecolors="k", linewidths=0.8, zorder=3, label="_valid")
            handles.append(Line2D([], [], ls="", marker="D", mfc="white", mec="k",
                                  label="validation NELBO, end of training"))
            handles += [Line2D([], [], ls="", marker="D", color=colors.get(v, OTHER_COLOR), mec="k",
                               label=f"{v} (validation; training on the {objective_of} panel)")
                        for v, _, _ in valid if v not in mine
                        for objective_of in {r[3] for r in rows if r[0] == v}]
        ax.set_xlabel("step")
        ax.set_ylabel(TRAINING_LOSS_LABELS.get(objective, f"training loss, {objective} (nats/token)"), fontsize=9)
        ax.legend(handles=handles, fontsize=7)
    return _save(plt, fig, path)


FIGURES = [("Perplexity vs alpha_0", "ppl_vs_alpha.png", fig_ppl_vs_alpha),
           ("Speed and quality of sampling", "speed_quality.png", fig_speed_quality),
           ("Generative perplexity vs sampling time and NFE over a grid of T (the paper's Pareto figure)",
            "pareto.png", fig_pareto),
           ("Sampling speedup vs sequence length", "speedup.png", fig_speedup),
           ("Training curves", "training.png", fig_training),
           ("Schedule search: Pareto front vs the default schedule", "search_pareto.png", fig_search)]
