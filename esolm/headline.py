"""Headline metrics and training curves as small git-tracked files (``esolm metrics``).

DVC experiments carry only what their commit holds, so the ``metrics`` stage copies the few
numbers that compare runs out of the cached per-variant outputs into
``reports/metrics/<variant>.json`` (test exact and NELBO perplexity, generative perplexity,
seconds per sample) and each variant's training curve into ``reports/curves/<variant>.csv``.
``dvc metrics show`` prints one row per variant, ``dvc exp show`` one column per number, and
``dvc plots diff`` overlays the curves of several experiments.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from esolm.io import write_json, write_text_atomic
from esolm.results import GenerationResult, LikelihoodResult

# headline key -> (file under runs/<variant>/, dotted key inside it)
HEADLINE: dict[str, tuple[str, str]] = {
    "exact_ppl": ("likelihood.json", "test.exact_l2r_ppl"),
    "nelbo_ppl": ("likelihood.json", "test.nelbo_ppl"),
    "gen_ppl": ("generation.json", "gen_ppl"),
    "s_per_sample": ("generation.json", "seconds_per_sample"),
}
CURVE_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")


def _lookup(obj: dict, dotted: str) -> float | None:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj if isinstance(obj, (int, float)) else None


def variant_headline(run: Path) -> dict[str, float | None]:
    """The headline numbers of one variant's run folder (None where a stage has not run), read
    through each file's one reader (``esolm.results``)."""
    loaded: dict[str, dict] = {}
    for result in (LikelihoodResult, GenerationResult):
        loaded[result.FILE] = result.read(run).to_json() if (run / result.FILE).exists() else {}
    return {key: _lookup(loaded[f], dotted) for key, (f, dotted) in HEADLINE.items()}


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


def write_headline(variants: list[str], runs: Path = Path("runs"),
                   out: Path = Path("reports")) -> dict[str, dict]:
    """Write ``out/metrics/<v>.json`` and ``out/curves/<v>.csv`` for every variant; files of
    variants no longer in ``variants`` are removed. Returns the headline numbers."""
    result = {}
    for folder, suffix in (("metrics", ".json"), ("curves", ".csv")):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).glob(f"*{suffix}"):
            if old.stem not in variants:
                old.unlink()
    for name in variants:
        result[name] = variant_headline(runs / name)
        write_json(out / "metrics" / f"{name}.json", result[name])
        write_text_atomic(out / "curves" / f"{name}.csv", curve_csv(runs / name / "train.jsonl"))
    return result
