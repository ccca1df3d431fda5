"""The report's numbers and sentences: SQL over the results database, one run id.

Everything here reads DuckDB only (``esolm.store.query``): the headline and Table 1 of a run,
which of the paper's orderings hold, the runs in the database, how the contestants were trained
and who judged their samples. Rendering is ``esolm.report``; figures ``esolm.report_figures``.
"""

from __future__ import annotations

import math
from pathlib import Path

from esolm.families import AR, ESO_B, MDLM  # the paper's claims name these families
from esolm.params import NOT_A_MODEL_SETTING
from esolm.store import query

RESULTS_TABLE_SQL = """
SELECT v.variant, v.family, v.alpha_0,
       max(CASE WHEN l.metric = 'exact_l2r_ppl' THEN l.value END) AS exact_l2r_ppl,
       max(CASE WHEN l.metric = 'exact_sampler_ppl' THEN l.value END) AS exact_sampler_ppl,
       -- the NELBO on the exact metrics' own tokens (older runs: on its own, larger, set of tokens)
       coalesce(max(CASE WHEN l.metric = 'nelbo_paired_ppl' THEN l.value END),
                max(CASE WHEN l.metric = 'nelbo_ppl' THEN l.value END)) AS nelbo_ppl,
       CASE WHEN max(CASE WHEN l.metric = 'nelbo_paired_ppl' THEN l.value END) IS NOT NULL
            THEN max(CASE WHEN l.metric = 'nelbo_paired_stderr' THEN l.value END)
            ELSE max(CASE WHEN l.metric = 'nelbo_stderr' THEN l.value END) END AS nelbo_stderr,
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


def results_table(db: Path, rid: str, split: str = "test") -> tuple[list[str], list[tuple]]:
    return query(RESULTS_TABLE_SQL, db, [split, rid])


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
           "exact_sampler_ppl": "exact PPL, sampler order", "nelbo_ppl": "NELBO PPL, exact's tokens (± s.e.)",
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


TABLE1_METRICS = ("exact_l2r", "exact_sampler", "nelbo", "nelbo_paired")  # then every iwK (the paper's law)
TABLE1_COLUMNS = ["variant", "family", "alpha_0", "split", "metric", "value", "stderr"]


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


ORDERING_HEADERS = ["the paper's ordering", "metric", "values (PPL)", "margin (s.e.)", "holds here"]

Info = dict[str, tuple[str, float | None]]  # variant -> (family, alpha_0)
Values = dict[tuple[str, str], tuple[float, float | None]]  # (variant, metric) -> (PPL, s.e. in PPL)


def _ppl_and_se(info: Info, val: Values, variant: str, base: str) -> tuple[float, float] | None:
    """(perplexity, standard error in nats) of one metric; table1_rows holds it in PPL."""
    if info[variant][0] == AR.name and base == "exact_sampler":
        base = "exact_l2r"  # AR: one order
    ppl, se = val.get((variant, f"{base}_ppl"), (None, None))
    if ppl is None or math.isnan(ppl):
        return None
    return ppl, (0.0 if se is None else se / ppl)


def _ordering_row(info: Info, val: Values, claim: str, lo: str, hi: str, base: str,
                  hi_base: str | None = None) -> tuple | None:
    """One claim ``lo < hi`` with its margin in standard errors, or None if a value is missing."""
    a, b = _ppl_and_se(info, val, lo, base), _ppl_and_se(info, val, hi, hi_base or base)
    if a is None or b is None:
        return None
    gap = math.log(b[0]) - math.log(a[0])
    se = math.hypot(a[1], b[1])
    margin = gap / se if se > 0 else (math.inf if gap > 0 else -math.inf if gap < 0 else 0.0)
    verdict = "yes" if margin > 2 else "yes, within noise" if margin > 0 else \
        "no, within noise" if margin > -2 else "no"
    label = base.replace("_", " ") + ("" if hi_base is None else f" vs {hi_base.replace('_', ' ')}")
    return (claim, label, f"{a[0]:.1f} vs {b[0]:.1f}", f"{margin:+.1f}", verdict)


def _claims(info: Info) -> list[tuple[str, str, str, str, str | None]]:
    """The paper's claims on these variants: (claim, lower, higher, metric base, higher's base)."""
    out = []
    chain = [v for v in info if info[v][0] == AR.name] + sorted(
        (v for v in info if info[v][0] == ESO_B.name and info[v][1] is not None), key=lambda v: info[v][1])
    for lo, hi in zip(chain, chain[1:]):
        out += [(f"{lo} < {hi}", lo, hi, base, None) for base in ("exact_sampler", "nelbo_paired")]
    for v in sorted(info):  # every NELBO here is on the exact metrics' own tokens (nelbo_paired)
        if info[v][0] != AR.name:  # both orders: the paper's "exact" column does not name its order
            out += [(f"{v}: exact <= NELBO", v, v, base, "nelbo_paired") for base in ("exact_l2r", "exact_sampler")]
    ones = [v for v in info if info[v][0] == ESO_B.name and info[v][1] == 1.0]
    for m in (v for v in info if info[v][0] == MDLM.name):
        for e in ones:
            out += [(f"{m} < {e}", m, e, base, None) for base in ("exact_sampler", "nelbo_paired")]
    return out


def orderings(db: Path, rid: str, split: str = "test") -> tuple[list[str], list[tuple]]:
    """Which of the paper's Table 1 orderings hold in this run, each with its margin in
    standard errors: (1) AR < Eso-LM (B) with alpha_0 ascending, (2) exact (left to right and in
    the sampler's order) <= NELBO per diffusion model, (3) MDLM < Eso-LM (B) alpha_0 = 1. The
    margin is the difference of the log perplexities (nats/token) over the standard error of
    that difference, the two standard errors combined as if independent (the same test rows score every model, so this
    is conservative); positive means the ordering holds, above 2 it holds clearly."""
    rows = [r for r in table1_rows(db, rid) if r["split"] == split]
    info = {r["variant"]: (r["family"], r["alpha_0"]) for r in rows}
    val = {(r["variant"], r["metric"]): (r["value"], r["stderr"]) for r in rows}
    out = [_ordering_row(info, val, *claim) for claim in _claims(info)]
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


RECIPE_SQL = """
SELECT variant, coalesce(init, 'unrecorded'), coalesce(objective, 'nelbo'), mask_warmup_start, mask_warmup_steps
FROM variants WHERE run_id = ? AND family != 'unigram' ORDER BY variant
"""


def recipe_line(db: Path, rid: str) -> str:
    """How the contestants were trained (init, objective, masking warm-up), from the variants
    table (ingested from their train.json; an init it did not record reads "unrecorded")."""
    _, rows = query(RECIPE_SQL, db, [rid])
    if not rows:
        return ""
    inits, objectives, warmups = set(), {}, {}
    for name, init, objective, start, steps in rows:
        inits.add(init)
        objectives.setdefault(objective, []).append(name)
        if start is not None and steps is not None:
            warmups.setdefault((start, steps), []).append(name)
    obj = "; ".join(f"{o} ({', '.join(v)})" for o, v in sorted(objectives.items()))
    warm = "; ".join(f"the largest diffusion time rose from {a:g} to 1 over the first {n} steps "
                     f"({', '.join(v)})" for (a, n), v in sorted(warmups.items()))
    return (f"Training: init {' / '.join(sorted(inits))}; objective {obj}; masking warm-up: "
            f"{warm or 'none'}. Validation and every likelihood here draw t over [eps, 1].")


JUDGE_SQL = """
SELECT s.judge, max(j.value) AS test_ppl
FROM (SELECT DISTINCT judge FROM sampling WHERE run_id = ?) s
LEFT JOIN judges j ON j.run_id = ? AND j.judge = s.judge AND j.split = 'test' AND j.metric = 'exact_l2r_ppl'
GROUP BY s.judge ORDER BY s.judge
"""


def judge_line(db: Path, rid: str) -> str:
    """Who scored the generative perplexity, and (for an esolm judge) its own test perplexity,
    from the judges table (ingested from runs/<judge>/likelihood.json)."""
    _, rows = query(JUDGE_SQL, db, [rid, rid])
    parts = [f"{name} (an AR model of its own stage, never a contestant; its test perplexity "
             f"{ppl:.1f})" if ppl is not None else str(name) for name, ppl in rows]
    return f"Generative perplexity is judged by {', '.join(parts)}." if parts else ""


SETTINGS_SQL = """
SELECT v.variant, v.settings, r.params FROM variants v JOIN runs r ON r.run_id = v.run_id
WHERE v.run_id = ? AND v.family != 'unigram' ORDER BY v.variant
"""


def settings_line(db: Path, rid: str) -> str:
    """Where a model was trained with other ``train:`` settings than the run's ``params.yaml``
    (a stage left out of a rerun): say so, naming the variant, the key and both values. The
    numbers in the report are the model file's; its settings come from its ``train.json``."""
    import json

    _, rows = query(SETTINGS_SQL, db, [rid])
    notes, unrecorded = [], []
    for variant, settings, params in rows:
        if not settings:
            unrecorded.append(variant)
            continue
        trained = json.loads(settings).get("train") or {}  # None: an imported model
        run_params = (json.loads(params) if params else None) or {}
        if variant == (run_params.get("judge") or {}).get("name", "judge"):
            continue  # the judge has its own train overrides
        wanted = run_params.get("train", {})
        diff = [f"train.{k}={trained[k]!r} (params.yaml: {wanted[k]!r})" for k in sorted(wanted)
                if k in trained and k not in NOT_A_MODEL_SETTING and trained[k] != wanted[k]]
        if diff:
            notes.append(f"{variant} was trained with {', '.join(diff)}")
    out = []
    if notes:
        out.append("Models older than params.yaml (rerun `dvc repro` to retrain them): " + "; ".join(notes) + ".")
    if unrecorded:
        out.append(f"Training settings not recorded (train.json before 2026-12): {', '.join(unrecorded)}.")
    return " ".join(out)


SEEDS_SQL = """
SELECT s.variant, s.seed, s.exact_ppl, s.nelbo_ppl, s.revision, s.same_params, s.command, s.finished, s.machine,
       max(CASE WHEN l.metric = 'exact_l2r_ppl' THEN l.value END) AS this_run
FROM seed_runs s
LEFT JOIN likelihood l ON l.run_id = s.run_id AND l.variant = s.variant AND l.split = 'test'
WHERE s.run_id = ?
GROUP BY ALL ORDER BY s.variant, s.seed
"""
SEED_HEADERS = ["variant", "this run", "seeds", "exact PPL, mean ± s.d.", "min - max", "NELBO PPL, mean ± s.d."]


def _mean_sd(values: list[float]) -> str:
    from esolm.spread import describe

    if not values:
        return "-"
    d = describe(values)
    return _fmt(d["mean"]) + (f" ± {_fmt(d['sd'])}" if d["sd"] is not None else "")


def seed_spread(db: Path, rid: str) -> tuple[str, list[str], list[tuple], str] | None:
    """The spread of each variant's test exact perplexity (left to right) and NELBO perplexity
    across training seeds (table seed_runs, from ``esolm spread``'s reports/seeds.json), beside
    this run's number: (title, columns, rows, the sentence that says where and when it was
    measured); None when the run has no spread."""
    _, rows = query(SEEDS_SQL, db, [rid])
    if not rows:
        return None
    by_variant: dict[str, list[tuple]] = {}
    for row in rows:
        by_variant.setdefault(row[0], []).append(row)
    table = []
    for variant, got in by_variant.items():
        exact = [r[2] for r in got if r[2] is not None]
        nelbo = [r[3] for r in got if r[3] is not None]
        table.append((variant, _fmt(got[0][9]), ", ".join(str(r[1]) for r in got), _mean_sd(exact),
                      f"{_fmt(min(exact))} - {_fmt(max(exact))}" if exact else "-", _mean_sd(nelbo)))
    _, _, _, _, revision, same, command, finished, machine, _ = rows[0]
    params = ("with this run's params (train.seed aside)" if same else
              "with other params than this run's: the spread shows the size of seed effects, not this run's numbers")
    caption = (f"Every variant retrained and evaluated once per training seed (`{command}` at revision "
               f"`{str(revision)[:10]}`, {finished}, {machine}), {params}. At this size the seed moves a "
               "perplexity more than its standard error over test tokens: read a single run's digits with this.")
    return "Across training seeds (test split, perplexity)", SEED_HEADERS, table, caption



def timing_line(db: Path, rid: str) -> str:
    """What the s/sample column is: one timed generation per variant, and how loaded the
    machine was while it ran (the 1-minute load average each sample stage recorded) when known."""
    _, rows = query("SELECT count(*), min(num_samples), max(num_samples), min(load_avg), max(load_avg), "
                    "max(cpus) FROM sampling WHERE run_id = ?", db, [rid])
    n, lo_n, hi_n, lo_load, hi_load, cpus = rows[0]
    if not n:
        return ""
    samples = f"{lo_n}" if lo_n == hi_n else f"{lo_n}-{hi_n}"
    line = (f"s/sample: one timed generation of {samples} samples per variant, not a benchmark (the speed "
            "table's medians over repeats are)")
    if hi_load is None:
        return line + "; the machine's load was not recorded."
    load = f"{lo_load:.1f}" if round(lo_load, 1) == round(hi_load, 1) else f"{lo_load:.1f}-{hi_load:.1f}"
    shared = (f": above {cpus} cores, other processes shared the machine, so these times are slower than "
              "an idle machine's" if cpus and hi_load > cpus else "")
    return line + f"; the machine's 1-minute load average after sampling was {load}" + \
        (f" on {cpus} cores" if cpus else "") + shared + "."
