"""The typed results of the stages, each with its file's one writer and one reader.

- ``LikelihoodResult``: ``runs/<variant>/likelihood.json`` (``esolm evaluate``, and the judge's);
- ``GenerationResult``: ``runs/<variant>/generation.json`` (``esolm sample``);
- ``CurveResult`` of ``CurvePoint``: ``runs/<variant>/curve.json`` (``esolm curve``).

The stages build them and call ``write``; the results database (``esolm.store``), the headline
metrics (``esolm.headline``) and the model card (``esolm.checkpoint``) call ``read``. The JSON is
what ``to_json`` gives, the same files as before these classes existed.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Self, TypeVar

from esolm.io import write_json

T = TypeVar("T")


def rerun(path: Path, stage: str) -> str:
    """How to write ``runs/<name>/<file>`` again: its stage for that variant (the judge stage
    for the judge's own ``likelihood.json``)."""
    name = path.parent.name
    if stage == "evaluate" and name == "judge":
        return "dvc repro -f judge (or esolm judge)"
    return f"dvc repro -f {stage}@{name} (or esolm {stage} --variant {name})"


def _read(path: Path, stage: str = "") -> dict:
    """The JSON object in ``path``; a missing, truncated, binary or foreign file is one line
    naming it and the stage that writes it again."""
    fix = rerun(path, stage) if stage else "dvc repro"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run its stage first ({fix})")
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}: corrupt); rerun the stage that writes it: {fix}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno}: "
                         f"truncated or corrupt); rerun the stage that writes it: {fix}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not the object its stage "  # noqa: TRY004
                         f"writes; rerun the stage that writes it: {fix}")
    return values


def _plain(cls: type[T], values: dict, where: str) -> T:
    """An instance of the flat dataclass ``cls`` from ``values``; a missing field is an error
    naming it and the file, unless it has a default (a field added later: older files lack it)."""
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise ValueError(f"{where} lacks {missing}; rerun its stage")
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


class _RunFile:
    """A result stored as ``runs/<variant>/<FILE>``: its one writer and its one reader."""

    FILE: str
    STAGE: str
    """The stage (verb) that writes it."""

    def write(self, run: Path) -> None:
        write_json(Path(run) / self.FILE, self.to_json())

    @classmethod
    def read(cls, run: Path) -> Self:
        path = Path(run) / cls.FILE
        values = _read(path, cls.STAGE)
        try:
            return cls.from_json(values, str(path))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            what = str(err).removesuffix("; rerun its stage") if isinstance(err, ValueError) else \
                f"{path} is not what its stage writes ({type(err).__name__}: {err})"
            raise ValueError(f"{what}; rerun the stage that writes it: {rerun(path, cls.STAGE)}") from None


@dataclass
class LikelihoodResult(_RunFile):
    """Every likelihood metric of one model, per split (``likelihood.evaluate_split``)."""

    variant: str | None
    """The variant evaluated (None in files written before it was recorded)."""
    family: str
    """Its family."""
    alpha_0: float | None
    """Its alpha_0."""
    splits: dict[str, dict[str, Any]]
    """Split (valid, test, zero_shot:<folder>) -> metric (exact_l2r_ppl, nelbo_ppl, iw4_ppl,
    bits_per_byte, seconds, ...) -> value."""

    FILE = "likelihood.json"
    STAGE = "evaluate"

    def to_json(self) -> dict:
        return {"variant": self.variant, "family": self.family, "alpha_0": self.alpha_0, **self.splits}

    @classmethod
    def from_json(cls, values: dict, where: str = FILE) -> LikelihoodResult:
        if "family" not in values:
            raise ValueError(f"{where} lacks 'family'; rerun its stage")
        return cls(values.get("variant"), values["family"], values.get("alpha_0"),
                   {k: v for k, v in values.items() if isinstance(v, dict)})

    def long_rows(self) -> list[dict]:
        """The numbers as long rows: split, metric, value."""
        return [{"split": split, "metric": k, "value": v} for split, vals in self.splits.items()
                for k, v in vals.items() if isinstance(v, (int, float))]


@dataclass
class GenerationResult(_RunFile):
    """The samples of one model, judged (``esolm sample``)."""

    variant: str
    """The variant sampled."""
    family: str
    """Its family."""
    nfe: int
    """Forward passes run (all samples)."""
    seconds: float
    """Wall time of sampling."""
    seconds_per_sample: float
    """``seconds`` over the samples drawn."""
    tokens_per_s: float
    """Tokens generated per second."""
    kv_cache: bool
    """Whether a cached path ran."""
    gen_ppl: float
    """Generative perplexity under the judge."""
    entropy: float
    """Mean unigram entropy of the samples (nats)."""
    judge: str
    """Who judged (the judge stage's model or hf:<name>)."""
    schedule: dict
    """The sampling settings that ran (``Generation.settings``)."""
    num_samples: int
    """Samples drawn."""
    load_avg: float | None = None
    """The machine's 1-minute load average right after sampling and judging (None where the
    system does not tell): above ``cpus``, other processes shared the CPUs while it was timed."""
    cpus: int | None = None
    """CPU cores of the machine (``os.cpu_count()``), to read ``load_avg`` against."""

    FILE = "generation.json"
    STAGE = "sample"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict, where: str = FILE) -> GenerationResult:
        return _plain(cls, values, where)


@dataclass
class CurvePoint:
    """One point of a speed-quality curve: the samples at one number of steps."""

    steps: int | None
    """Diffusion steps T (None for AR: one point, NFE = L)."""
    nfe: int
    """Forward passes run."""
    seconds_per_sample: float
    """Wall time per sample."""
    gen_ppl: float
    """Generative perplexity under the judge."""
    entropy: float
    """Mean unigram entropy of the samples (nats)."""


@dataclass
class CurveResult(_RunFile):
    """Generative perplexity against sampling time over a grid of T (``esolm curve``)."""

    variant: str
    """The variant sampled."""
    family: str
    """Its family."""
    alpha_0: float
    """Its alpha_0."""
    judge: str
    """Who judged."""
    num_samples: int
    """Samples per point."""
    top_p: float
    """Nucleus mass of every point."""
    points: list[CurvePoint]
    """The points, in the order of the grid."""

    FILE = "curve.json"
    STAGE = "curve"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict, where: str = FILE) -> CurveResult:
        flat = _plain(cls, values, where)
        flat.points = [_plain(CurvePoint, p, f"{where} points") for p in values["points"]]
        return flat
