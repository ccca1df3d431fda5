"""Reading prepared shards: ``read_meta``, ``load_split`` and the ``Batches`` iterator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def read_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` of a prepared data folder (see ``esolm.data.prepare``)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data first (`esolm prepare`, "
                                "or esolm.data.prepare(DataConfig(...)))")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); it is truncated: "
                         "prepare the data again (esolm prepare)") from err
    if not isinstance(meta, dict) or "splits" not in meta:
        raise ValueError(f"{path} is not an esolm meta.json (no 'splits'): prepare the data again")
    return meta


def load_split(data_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split as a read-only memmap [rows, length] (uint16 or uint32)."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r}: {data_dir} has {sorted(meta['splits'])}")
    rows, length, dtype = meta["splits"][split]["rows"], meta["length"], np.dtype(meta["dtype"])
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the data again")
    if path.stat().st_size != rows * length * dtype.itemsize:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, meta.json expects "
                         f"{rows} x {length} x {dtype.itemsize}: prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r", shape=(rows, length))


class Batches:
    """Random batches of rows of one split, LongTensor [batch_size, length], on CPU.

    Epoch e visits the rows in the permutation drawn from (seed, e); step i of an epoch takes
    the global batch ``perm[i*B*W:(i+1)*B*W]`` (B = batch_size, W = world_size) and rank r gets
    its slice ``[r*B:(r+1)*B]``, so ranks get disjoint rows and together the rows of a single
    process with batch size B*W. The last partial global batch of an epoch is dropped.
    Iterating never ends (epochs follow each other); ``batch_at(step)`` is a pure function of
    the seed and the step, so training resumes exactly from the step alone.
    """

    def __init__(self, data: str | os.PathLike | np.ndarray, split: str = "train",
                 batch_size: int = 32, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.rows = data if isinstance(data, np.ndarray) else load_split(data, split)
        if self.rows.ndim != 2:
            raise ValueError(f"rows must be an array [rows, length], got shape {self.rows.shape}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size, "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle = shuffle
        self.steps_per_epoch = len(self.rows) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"split {split!r} has {len(self.rows)} rows, fewer than one global "
                             f"batch of {batch_size} x {world_size} ranks: use a smaller batch")
        self._step = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Steps (batches per rank) in one epoch."""
        return self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch`` (cached for the current epoch)."""
        if epoch != self._perm_epoch:
            n = len(self.rows)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                          if self.shuffle else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def rows_at(self, step: int) -> np.ndarray:
        """Row indices [batch_size] that this rank reads at global ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = (index * self.world_size + self.rank) * self.batch_size
        return self._order(epoch)[start:start + self.batch_size]

    def batch_at(self, step: int) -> torch.Tensor:
        """The batch LongTensor [batch_size, length] of global ``step`` (0-based)."""
        idx = self.rows_at(step)
        order = np.argsort(idx, kind="stable")  # read the memmap in file order
        out = np.empty((len(idx), self.rows.shape[1]), dtype=np.int64)
        out[order] = self.rows[idx[order]]
        return torch.from_numpy(out)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.batch_at(self._step)
        self._step += 1
        return batch
