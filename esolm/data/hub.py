"""Hub sources: ``hf:<name>[:<config>]``, read with ``datasets`` (imported only when used).

``<name>`` is a local path (a folder written by ``save_to_disk``, a data folder, or one data
file), or a dataset of the Hugging Face hub, read from the local cache unless
``allow_network`` is set. The usual benchmarks (openwebtext, lm1b, wikitext, ptb, lambada) are
loaded by the field's conventions (``HF_CONVENTIONS``). Documents stay in the ``datasets``
tables: each split is a lazy view of one text column (``TextColumn``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esolm.data.config import DataConfig
from esolm.data.corpus import SPLITS, Corpus


@dataclass(frozen=True)
class HubConvention:
    """How the field loads a named benchmark: hub id, config, text column, split rule."""

    path: str
    config: str | None = None
    column: str | None = None
    splits: str = "standard"  # 'standard' | 'openwebtext' | 'eval_only'


HF_CONVENTIONS = {
    "openwebtext": HubConvention("Skylion007/openwebtext", splits="openwebtext"),
    "lm1b": HubConvention("billion-word-benchmark/lm1b"),
    "wikitext-103": HubConvention("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikitext-2": HubConvention("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "ptb_text_only": HubConvention("ptb-text-only/ptb_text_only", column="sentence"),
    "lambada": HubConvention("EleutherAI/lambada_openai", splits="eval_only"),
}
OPENWEBTEXT_VALID_DOCS = 100_000
_SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "val": "valid",
                "dev": "valid", "test": "test"}
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                   ".txt": "text", ".arrow": "arrow"}


class TextColumn(Sequence):
    """A lazy view of one text column of a ``datasets.Dataset`` (optionally a subset of rows).

    Slicing reads a batch of rows at once, so documents are never all in memory together.
    """

    def __init__(self, ds: Any, column: str, rows: np.ndarray | None = None) -> None:
        self.ds, self.column, self.rows = ds.select_columns([column]), column, rows

    def __len__(self) -> int:
        return len(self.ds) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            span = range(len(self))[i]
            if self.rows is None and span.step == 1:
                return [str(t or "") for t in self.ds[span.start:span.stop][self.column]]
            index = np.asarray(span) if self.rows is None else self.rows[np.asarray(span)]
            return [str(t or "") for t in self.ds[index.tolist()][self.column]]
        i = range(len(self))[i]
        return str(self.ds[int(i if self.rows is None else self.rows[i])][self.column] or "")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make ``datasets`` / ``huggingface_hub`` use only local caches for the duration."""
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         constants.HF_HUB_OFFLINE) = saved


def _load_local(path: Path, config: str | None, cache_dir: str) -> Any:
    """A local dataset: a ``save_to_disk`` folder, a data folder, or one data file."""
    import datasets

    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        return datasets.load_from_disk(str(path))
    hf_cache = str(Path(cache_dir) / "hf")
    if path.is_dir():
        return datasets.load_dataset(str(path), config, cache_dir=hf_cache)
    builder = _LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"cannot load {path} with datasets: use one of {sorted(_LOCAL_BUILDERS)} "
                         "files, a data folder, or a folder written by save_to_disk")
    return datasets.load_dataset(builder, data_files=str(path), cache_dir=hf_cache)


def _load_hub(path: str, config: str | None, allow_network: bool, shown: str) -> Any:
    """``datasets.load_dataset(path, config)``; only from local caches unless network is allowed."""
    import datasets

    if allow_network:
        try:
            return datasets.load_dataset(path, config)
        except ConnectionError as e:
            raise RuntimeError(
                f"source {shown!r} needs the Hugging Face hub, which this machine cannot reach ({e}; "
                "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE switch it off). Run where the hub is reachable "
                "once (the copy is cached), or point data.source at a local copy (files:<glob>)"
            ) from e
    try:
        with _hub_offline():
            return datasets.load_dataset(path, config)
    except Exception as e:
        raise RuntimeError(
            f"source {shown!r} is not available offline and network is disabled "
            f"({type(e).__name__}: {e}). Set allow_network: true in the data config to download "
            "it from the hub, or point the source at a local copy (hf:<path> or files:<glob>)"
        ) from e


def _named_splits(loaded: Any) -> dict[str, Any]:
    """Our split names ('train' / 'valid' / 'test') -> ``datasets.Dataset``."""
    if not isinstance(loaded, dict):
        return {"train": loaded}
    found = {_SPLIT_NAMES[k]: loaded[k] for k in loaded if k in _SPLIT_NAMES}
    if "train" not in found and len(loaded) == 1:
        found["train"] = loaded[next(iter(loaded))]
    if not found:
        raise ValueError(f"dataset splits {list(loaded.keys())} include none of {sorted(_SPLIT_NAMES)}")
    return found


def _column_views(named: dict[str, Any], column: str, rule: str, cfg: DataConfig) -> dict:
    """Map available splits onto train / valid / test by the field's rule."""
    if rule == "eval_only":
        only = next(named[s] for s in ("test", "valid", "train") if s in named)
        return {s: TextColumn(only, column) for s in SPLITS}
    if "train" not in named:
        raise ValueError(f"the dataset has splits {sorted(named)} but no training split")
    train = named["train"]
    n = len(train)
    if rule == "openwebtext":
        if n <= OPENWEBTEXT_VALID_DOCS:
            raise ValueError(f"openwebtext has {n} documents, expected more than "
                             f"{OPENWEBTEXT_VALID_DOCS} (its last ones are the validation set)")
        cut = n - OPENWEBTEXT_VALID_DOCS
        views = {"train": TextColumn(train, column, np.arange(cut)),
                 "valid": TextColumn(train, column, np.arange(cut, n))}
    elif "valid" in named:
        views = {"train": TextColumn(train, column), "valid": TextColumn(named["valid"], column)}
    else:
        perm = np.random.default_rng(cfg.split_seed).permutation(n)
        n_valid = min(max(1, round(n * cfg.split_fractions[1])), n - 1)
        views = {"train": TextColumn(train, column, np.sort(perm[n_valid:])),
                 "valid": TextColumn(train, column, np.sort(perm[:n_valid]))}
    views["test"] = TextColumn(named["test"], column) if "test" in named else views["valid"]
    return views


def hf_corpus(name: str, config: str | None, cfg: DataConfig) -> Corpus:
    """A ``datasets`` corpus: a local path, or a hub dataset (offline unless allowed).

    Splits: validation -> valid; no test -> test = valid; no valid -> carved from train with
    ``cfg.split_seed`` (``split_fractions[1]`` of it). openwebtext: its last 100k training
    documents are valid (and test). lambada: evaluation only, every split is its test set.
    """
    local = Path(name).expanduser()
    if local.exists():
        conv, loaded = HubConvention(name), _load_local(local, config, cfg.cache_dir)
    else:
        conv = HF_CONVENTIONS.get(name, HubConvention(name))
        loaded = _load_hub(conv.path, config or conv.config, cfg.allow_network, cfg.source)
    column = conv.column if conv.column and cfg.text_column == "text" else cfg.text_column
    named = _named_splits(loaded)
    for split, ds in named.items():
        if column not in ds.column_names:
            raise ValueError(f"source {cfg.source!r} split {split!r} has no column {column!r} "
                             f"(columns: {ds.column_names}): set text_column to the text column")
    inputs = {f"{cfg.source}/{s}": f"fingerprint:{ds._fingerprint}" for s, ds in named.items()}
    return Corpus(_column_views(named, column, conv.splits, cfg), inputs)
