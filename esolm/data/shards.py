"""Token shards on disk: packing documents into rows, dtypes, and atomic file writes.

A shard ``<split>.bin`` is the raw bytes of an array [rows, length] of token ids (uint16 or
uint32, native byte order); ``meta.json`` beside it gives rows, length and dtype, so
``np.memmap`` can open it without reading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esolm.io import atomic_path, write_text_atomic  # noqa: F401 - re-exported

PACK_DTYPE = np.int64  # working dtype while packing; shards are cast to the token dtype


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The shard dtype for ids 0..vocab_size (vocab_size itself is reserved for a mask token).

    'auto' gives uint16 when vocab_size + 1 ids fit in it, else uint32. An explicit dtype that
    is too small is a ValueError.
    """
    needed = vocab_size + 1
    if requested == "auto":
        return np.dtype(np.uint16 if needed <= 1 << 16 else np.uint32)
    dtype = np.dtype(requested)
    if dtype.kind != "u" or needed > int(np.iinfo(dtype).max) + 1:
        raise ValueError(
            f"token_dtype={requested!r} cannot hold {needed} ids (vocabulary {vocab_size} + one "
            "reserved mask id): use token_dtype 'auto' or 'uint32', or a smaller vocabulary"
        )
    return dtype


def wrap_rows(docs: list[list[int]], sep_id: int, length: int,
              carry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Join ``carry`` and the documents, each followed by ``sep_id``; cut into full rows.

    Returns (rows [n, length], the tokens left over for the next call).
    """
    ends = len(carry) + np.cumsum([len(d) + 1 for d in docs], dtype=np.int64)
    flat = np.empty(int(ends[-1]) if len(docs) else len(carry), dtype=PACK_DTYPE)
    flat[:len(carry)] = carry
    start = len(carry)
    for doc, end in zip(docs, ends):
        flat[start:end - 1] = doc
        start = int(end)
    flat[ends - 1] = sep_id
    n = len(flat) // length * length
    return flat[:n].reshape(-1, length), flat[n:].copy()


def pad_rows(docs: list[list[int]], sep_id: int, pad_id: int,
             length: int) -> tuple[np.ndarray, int]:
    """One row per document: the document, ``sep_id`` if it fits, then ``pad_id`` up to ``length``.

    Documents longer than ``length`` are truncated. Returns (rows [len(docs), length],
    number of truncated documents).
    """
    rows = np.full((len(docs), length), pad_id, dtype=PACK_DTYPE)
    truncated = 0
    for i, doc in enumerate(docs):
        k = min(len(doc), length)
        rows[i, :k] = doc[:k]
        if len(doc) < length:
            rows[i, len(doc)] = sep_id
        else:
            truncated += 1
    return rows, truncated


@dataclass
class SplitStats:
    """What went into one shard: rows written, document tokens (without separators or pads),
    documents, UTF-8 bytes of their text, and documents truncated by ``pad`` packing."""

    rows: int = 0
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    truncated: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["bytes_per_token"] = round(self.bytes / self.tokens, 4) if self.tokens else None
        return out


class ShardWriter:
    """Packs encoded documents into rows of ``length`` and appends them to an open file.

    packing 'wrap' carries the unfinished row over to the next call and drops it at the end;
    'pad' writes one row per document. Usage: ``add`` per batch of documents, then ``close``.
    """

    def __init__(self, path: Path, packing: str, length: int, dtype: np.dtype, sep_id: int,
                 pad_id: int | None) -> None:
        if packing == "pad" and pad_id is None:
            raise ValueError("packing 'pad' needs a pad id")
        self.packing, self.length, self.dtype = packing, length, np.dtype(dtype)
        self.sep_id, self.pad_id = sep_id, pad_id
        self.stats = SplitStats()
        self._carry = np.empty(0, dtype=PACK_DTYPE)
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())

    def add(self, docs: list[list[int]], n_bytes: int) -> None:
        """Append the rows of a batch of encoded documents (``n_bytes``: their UTF-8 size)."""
        if not docs:
            return
        if self.packing == "wrap":
            rows, self._carry = wrap_rows(docs, self.sep_id, self.length, self._carry)
        else:
            rows, truncated = pad_rows(docs, self.sep_id, int(self.pad_id), self.length)
            self.stats.truncated += truncated
        self._file.write(rows.astype(self.dtype).tobytes())
        self.stats.rows += len(rows)
        self.stats.documents += len(docs)
        self.stats.tokens += sum(len(d) for d in docs)
        self.stats.bytes += n_bytes

    def close(self) -> SplitStats:
        """Close the file (the last partial 'wrap' row is dropped) and return the stats."""
        self._file.close()
        return self.stats
