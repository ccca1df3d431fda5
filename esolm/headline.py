"""Headline metrics and training curves as small git-tracked files, each written by the stage
that computes it.

DVC experiments carry only what their commit holds, and ``dvc exp run ... evaluate@V`` runs
only the stages that ``evaluate@V`` needs; so every stage writes its own few numbers beside its
cached outputs (DVC ``metrics:`` / ``plots:`` of that stage):

- ``train@V``: ``reports/curves/V.csv`` (the training curve);
- ``evaluate@V``: ``reports/metrics/V/likelihood.json`` (test exact and NELBO perplexity);
- ``sample@V``: ``reports/metrics/V/sampling.json`` (generative perplexity, seconds per sample).

``dvc metrics show`` prints them, ``dvc exp show`` gives each a column, ``dvc plots diff``
overlays the curves of several experiments, and ``esolm metrics`` prints one row per variant.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from esolm.io import write_json, write_text_atomic
from esolm.results import GenerationResult, LikelihoodResult

REPORTS = Path("reports")
# headline key -> dotted key inside the stage's result (``esolm.results``), per stage
# nelbo_ppl: the NELBO on the exact likelihood's own tokens, so the two numbers of a row compare
LIKELIHOOD_KEYS = {"exact_ppl": "test.exact_l2r_ppl", "nelbo_ppl": "test.nelbo_paired_ppl"}
SAMPLING_KEYS = {"gen_ppl": "gen_ppl", "s_per_sample": "seconds_per_sample"}
HEADLINE = (*LIKELIHOOD_KEYS, *SAMPLING_KEYS)
CURVE_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")


def _lookup(obj: dict, dotted: str) -> float | None:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj if isinstance(obj, (int, float)) else None


def metrics_file(variant: str, stage: str, out: Path = REPORTS) -> Path:
    """``out/metrics/<variant>/<stage>.json`` (stage: ``likelihood`` or ``sampling``)."""
    return out / "metrics" / variant / f"{stage}.json"


def write_likelihood_metrics(variant: str, result: LikelihoodResult, out: Path = REPORTS) -> dict:
    """The evaluate stage's headline numbers (its one writer of them)."""
    numbers = {k: _lookup(result.to_json(), d) for k, d in LIKELIHOOD_KEYS.items()}
    write_json(metrics_file(variant, "likelihood", out), numbers)
    return numbers


def write_sampling_metrics(variant: str, result: GenerationResult, out: Path = REPORTS) -> dict:
    """The sample stage's headline numbers (its one writer of them)."""
    numbers = {k: _lookup(result.to_json(), d) for k, d in SAMPLING_KEYS.items()}
    write_json(metrics_file(variant, "sampling", out), numbers)
    return numbers


def curve_csv(train_jsonl: Path) -> str:
    """``train.jsonl`` rows as CSV text with the columns of ``CURVE_COLUMNS``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    if train_jsonl.exists():
        for line in train_jsonl.read_text().splitlines():
            if line.strip():
                writer.writerow(json.loads(line))
    return buf.getvalue()


def write_curve(variant: str, train_jsonl: Path, out: Path = REPORTS) -> Path:
    """The train stage's curve file ``out/curves/<variant>.csv`` (its one writer)."""
    path = out / "curves" / f"{variant}.csv"
    write_text_atomic(path, curve_csv(train_jsonl))
    return path


def read_headline(variants: list[str], out: Path = REPORTS) -> dict[str, dict[str, float | None]]:
    """The headline numbers of each variant as its stages wrote them (None where a stage has
    not run): the reader of the files above, for ``esolm metrics`` and the Prefect artifact."""
    table = {}
    for name in variants:
        row: dict[str, float | None] = dict.fromkeys(HEADLINE)
        for stage in ("likelihood", "sampling"):
            path = metrics_file(name, stage, out)
            if path.is_file():
                row.update({k: v for k, v in json.loads(path.read_text()).items() if k in row})
        table[name] = row
    return table
