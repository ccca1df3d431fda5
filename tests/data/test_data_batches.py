"""Batches: seeded, sharded across ranks, resumable; load_split / read_meta on a prepared folder."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from esolm.data import Batches, DataConfig, load_split, prepare, read_meta

ROWS = np.arange(103 * 8, dtype=np.uint16).reshape(103, 8)  # row r holds 8r..8r+7


def _row_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // 8).tolist()


def test_same_seed_same_batches_and_epochs_visit_each_row_once():
    a, b = Batches(ROWS, batch_size=4, seed=7), Batches(ROWS, batch_size=4, seed=7)
    assert len(a) == 25
    first = list(islice(a, 50))
    assert all(torch.equal(x, y) for x, y in zip(first, islice(b, 50)))
    assert first[0].dtype == torch.int64 and first[0].shape == (4, 8)
    epoch0 = [r for batch in first[:25] for r in _row_ids(batch)]
    assert len(set(epoch0)) == 100  # no repeats; 3 rows dropped with the last partial batch
    assert epoch0 != [r for batch in first[25:] for r in _row_ids(batch)]  # reshuffled
    other = next(Batches(ROWS, batch_size=4, seed=8))
    assert not torch.equal(first[0], other)
    assert torch.equal(Batches(ROWS, batch_size=4, seed=7).batch_at(30), first[30])


def test_ranks_are_disjoint_and_together_the_single_process_batch():
    single = Batches(ROWS, batch_size=12, seed=1)
    ranks = [Batches(ROWS, batch_size=4, seed=1, rank=r, world_size=3) for r in range(3)]
    assert len(single) == len(ranks[0]) == 8
    for step in range(20):
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat(parts), next(single))
        ids = [set(_row_ids(p)) for p in parts]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]), step


def test_a_batch_is_a_pure_function_of_the_step():
    """What exact resume relies on: batch_at(step) equals the step-th batch of the iteration,
    across an epoch boundary, from a fresh object."""
    run = Batches(ROWS, batch_size=4, seed=3)
    expected = list(islice(run, 32))  # into the second epoch
    fresh = Batches(ROWS, batch_size=4, seed=3)
    assert all(torch.equal(expected[s], fresh.batch_at(s)) for s in (27, 3, 31, 0, 25))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank < world_size"):
        Batches(ROWS, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="103 rows, fewer than one global batch"):
        Batches(ROWS, batch_size=64, world_size=2)
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        read_meta("/nonexistent/folder")


def test_reads_a_prepared_folder(small_cfg: DataConfig):
    out: Path = prepare(small_cfg, progress=False)
    valid = load_split(out, "valid")
    assert isinstance(valid, np.memmap) and valid.shape == (read_meta(out)["splits"]["valid"]["rows"], 16)
    batches = Batches(out, "train", batch_size=2, seed=0, shuffle=False)
    np.testing.assert_array_equal(next(batches).numpy(), load_split(out, "train")[:2])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split(out, "dev")
