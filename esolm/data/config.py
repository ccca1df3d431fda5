"""The data-preparation config: one frozen dataclass, validated once at construction."""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

PACKINGS = ("wrap", "pad")
TOKEN_DTYPES = ("auto", "uint16", "uint32")
NAMED_TOKENIZERS = ("gpt2", "bert-base-uncased")
SOURCE_FORMS = "'sotu', 'hf:<name>[:<config>]' or 'files:<glob>'"
TOKENIZER_FORMS = ("'bpe:<vocab_size>' (e.g. 'bpe:2048'), 'gpt2', 'bert-base-uncased' or "
                   "'file:<path to tokenizer.json>'")
MIN_BPE_VOCAB = 258  # 256 byte symbols + the separator + at least one merge
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _bad(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"DataConfig.{field}={value!r} is invalid: {allowed}")


def parse_source(source: str) -> tuple[str, str, str | None]:
    """Split a source into (kind, argument, hub config).

    'sotu' -> ('sotu', '', None); 'hf:wikitext:wikitext-2-raw-v1' -> ('hf', 'wikitext',
    'wikitext-2-raw-v1'); 'files:corpus/*.txt' -> ('files', 'corpus/*.txt', None).
    """
    if source == "sotu":
        return "sotu", "", None
    kind, sep, rest = source.partition(":")
    if sep and kind == "hf" and rest:
        name, _, config = rest.partition(":")
        if name:
            return "hf", name, config or None
    if sep and kind == "files" and rest:
        return "files", rest, None
    raise _bad("source", source, f"use {SOURCE_FORMS}")


def parse_tokenizer(name: str) -> tuple[str, int | None]:
    """Split a tokenizer name into (kind, vocab size): 'bpe:2048' -> ('bpe', 2048)."""
    if name in NAMED_TOKENIZERS:
        return name, None
    kind, sep, rest = name.partition(":")
    if kind == "file" and sep and rest:
        return "file", None
    if kind == "bpe" and sep and rest.isdigit():
        if int(rest) < MIN_BPE_VOCAB:
            raise _bad("tokenizer", name, f"a BPE vocabulary needs at least {MIN_BPE_VOCAB} ids")
        return "bpe", int(rest)
    raise _bad("tokenizer", name, f"use {TOKENIZER_FORMS}")


def _check_fractions(value: Any) -> tuple[float, float, float]:
    """Three positive fractions (train, valid, test) summing to 1."""
    allowed = "give three positive numbers (train, valid, test) that sum to 1, e.g. (0.9, 0.05, 0.05)"
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise _bad("split_fractions", value, allowed)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _bad("split_fractions", value, allowed)
    out = tuple(float(v) for v in value)
    if min(out) <= 0 or not math.isclose(sum(out), 1.0, abs_tol=1e-6):
        raise _bad("split_fractions", value, allowed)
    return out  # type: ignore[return-value]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus comes from, how it is tokenized, and how it is cut into rows.

    dataset: short name of the output folder ``<out_dir>/<dataset>/``. source: 'sotu' (the
    embedded default corpus), 'hf:<name>[:<config>]' (``datasets``; a local path works too) or
    'files:<glob>' (.txt / .jsonl / .parquet). tokenizer: 'bpe:<N>' (byte-level BPE trained on
    the training split), 'gpt2' or 'bert-base-uncased'. packing: 'wrap' (documents joined by the
    separator and cut into rows) or 'pad' (one document per row, padded). length: tokens per
    row. split_fractions: (train, valid, test) for sources without their own splits.
    allow_network: hub downloads (``datasets``/``tokenizers``) only when True. token_dtype:
    'auto' picks uint16 when vocab_size + 1 (a reserved mask id) fits, else uint32.
    """

    dataset: str = "sotu"
    source: str = "sotu"
    tokenizer: str = "bpe:2048"
    packing: str = "wrap"
    length: int = 64
    text_column: str = "text"
    split_seed: int = 0
    split_fractions: tuple = (0.9, 0.05, 0.05)
    allow_network: bool = False
    out_dir: str = "data/processed"
    cache_dir: str = "data/raw"
    token_dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not _SAFE_NAME.match(self.dataset):
            raise _bad("dataset", self.dataset, "use a folder name of letters, digits, '.', '_', '-'")
        if not isinstance(self.source, str):
            raise _bad("source", self.source, f"use {SOURCE_FORMS}")
        parse_source(self.source)
        if not isinstance(self.tokenizer, str):
            raise _bad("tokenizer", self.tokenizer, f"use {TOKENIZER_FORMS}")
        parse_tokenizer(self.tokenizer)
        if self.packing not in PACKINGS:
            raise _bad("packing", self.packing, f"use one of {PACKINGS}")
        if not _is_int(self.length) or self.length < 2:
            raise _bad("length", self.length, "use an integer >= 2")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise _bad("text_column", self.text_column, "use a non-empty column name")
        if not _is_int(self.split_seed) or self.split_seed < 0:
            raise _bad("split_seed", self.split_seed, "use an integer >= 0")
        object.__setattr__(self, "split_fractions", _check_fractions(self.split_fractions))
        if not isinstance(self.allow_network, bool):
            raise _bad("allow_network", self.allow_network, "use true or false")
        for name in ("out_dir", "cache_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise _bad(name, value, "use a non-empty path")
            object.__setattr__(self, name, str(value))
        if self.token_dtype not in TOKEN_DTYPES:
            raise _bad("token_dtype", self.token_dtype, f"use one of {TOKEN_DTYPES}")

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """Build from a plain dict (a params.yaml section); unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"DataConfig.from_dict expects a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown data config key {key!r}: {hint}valid keys are {names}")
        return cls(**d)
