"""prepare(): shards, packing, meta.json, determinism, reruns, clear failures."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from esolm.data import DataConfig, load_split, prepare, read_meta
from esolm.data.shards import pad_rows, token_dtype, wrap_rows
from esolm.data.sources import load_corpus

OUTPUTS = ("train.bin", "valid.bin", "test.bin", "tokenizer.json", "meta.json")


def _docs(cfg: DataConfig, split: str) -> list[str]:
    seq = load_corpus(cfg, progress=False).splits[split]
    return [d for d in seq[0:len(seq)] if d.strip()]


def test_wrap_shards_and_meta(small_cfg: DataConfig):
    out = prepare(small_cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    meta = read_meta(out)
    assert (meta["vocab_size"], meta["mask_id"], meta["eos_id"], meta["pad_id"]) == (300, 300, 0, None)
    assert (meta["dtype"], meta["length"], meta["packing"]) == ("uint16", 16, "wrap")
    assert len(meta["inputs"]) == 40 and all(v.startswith("sha256:") for v in meta["inputs"].values())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for split in ("train", "valid", "test"):
        rows, docs, info = load_split(out, split), _docs(small_cfg, split), meta["splits"][split]
        assert rows.dtype == np.uint16 and rows.shape == (info["rows"], 16) and info["rows"] > 0
        ids = [[*tok.encode(d, add_special_tokens=False).ids, 0] for d in docs]
        flat = [t for doc in ids for t in doc]
        assert info["tokens"] == len(flat) - len(docs) and info["documents"] == len(docs)
        assert info["rows"] == len(flat) // 16  # the remainder is dropped
        np.testing.assert_array_equal(rows.reshape(-1), flat[:rows.size])


def test_pad_rows_hold_one_document_each(small_cfg: DataConfig):
    cfg = replace(small_cfg, packing="pad", length=128)
    out = prepare(cfg, progress=False)
    meta = read_meta(out)
    pad, sep = meta["pad_id"], meta["separator_id"]
    assert pad == 300 and meta["vocab_size"] == 301 and sep == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.id_to_token(pad) == "<|pad|>"
    rows, docs = load_split(out, "train"), _docs(cfg, "train")
    assert rows.shape == (len(docs), 128)
    n_truncated = 0
    for row, doc in zip(rows, docs):
        ids = tok.encode(doc, add_special_tokens=False).ids
        if len(ids) >= 128:
            n_truncated += 1
            assert list(row) == ids[:128]
        else:
            assert list(row) == ids + [sep] + [pad] * (127 - len(ids))
    assert 0 < n_truncated < len(docs) and meta["splits"]["train"]["truncated"] == n_truncated


def test_packing_helpers():
    rows, carry = wrap_rows([[1, 2, 3], [4]], sep_id=0, length=4, carry=np.array([9]))
    assert rows.tolist() == [[9, 1, 2, 3]] and carry.tolist() == [0, 4, 0]
    rows, truncated = pad_rows([[1, 2], [3, 4, 5, 6, 7]], sep_id=0, pad_id=8, length=4)
    assert rows.tolist() == [[1, 2, 0, 8], [3, 4, 5, 6]] and truncated == 1


def test_two_runs_give_identical_bytes(small_cfg: DataConfig, tmp_path: Path):
    a = prepare(small_cfg, progress=False)
    b = prepare(replace(small_cfg, out_dir=str(tmp_path / "again")), progress=False)
    for name in OUTPUTS[:4]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rerun_skips_work_until_config_or_inputs_change(small_cfg: DataConfig, txt_corpus: Path):
    out = prepare(small_cfg, progress=False)
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in OUTPUTS}
    t0 = time.perf_counter()
    assert prepare(small_cfg, progress=True) == out  # prints "up to date"
    assert time.perf_counter() - t0 < 0.5
    assert {n: os.stat(out / n).st_mtime_ns for n in OUTPUTS} == mtimes
    (txt_corpus / "doc000.txt").write_text("a changed document " * 20, encoding="utf-8")
    prepare(small_cfg, progress=False)
    assert os.stat(out / "meta.json").st_mtime_ns != mtimes["meta.json"]
    assert read_meta(out)["length"] == 16
    prepare(replace(small_cfg, length=8), progress=False)
    assert read_meta(out)["length"] == 8


def test_empty_split_is_a_clear_error_and_writes_nothing(small_cfg: DataConfig):
    cfg = replace(small_cfg, length=2048)
    with pytest.raises(ValueError, match=r"split 'valid' is empty.*smaller length or more data"):
        prepare(cfg, progress=False)
    out = Path(cfg.out_dir) / cfg.dataset
    assert not out.exists() and list(out.parent.iterdir()) == []  # no staging folder left


def test_failed_rerun_keeps_the_previous_dataset_whole(small_cfg: DataConfig):
    """A failed (or killed) prepare used to delete the good meta.json first."""
    out = prepare(small_cfg, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="is empty"):
        prepare(replace(small_cfg, length=2048), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # meta.json included
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging folder left
    assert prepare(small_cfg, progress=False) == out  # still complete and current: nothing to redo


def test_hf_local_dataset_end_to_end(tmp_path: Path, small_cfg: DataConfig, txt_corpus: Path):
    import datasets

    texts = [p.read_text(encoding="utf-8") for p in sorted(txt_corpus.glob("*.txt"))]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:30]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[30:]})}
                         ).save_to_disk(str(tmp_path / "hf"))
    out = prepare(replace(small_cfg, source=f"hf:{tmp_path / 'hf'}"), progress=False)
    meta = read_meta(out)
    assert meta["splits"]["train"]["documents"] == 30 and meta["splits"]["valid"]["documents"] == 10
    np.testing.assert_array_equal(load_split(out, "valid"), load_split(out, "test"))


def test_token_dtype_choice_and_explicit_dtype_too_small():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    assert token_dtype(50258, "uint32") == np.uint32
    with pytest.raises(ValueError, match=r"token_dtype='uint16' cannot hold 70001 ids"):
        token_dtype(70000, "uint16")


def test_unknown_source_is_rejected_before_any_work(tmp_path: Path):
    with pytest.raises(ValueError, match=r"DataConfig.source='ftp://x'.*'sotu', 'hf:<name>"):
        prepare(DataConfig(source="ftp://x", out_dir=str(tmp_path)), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_meta_and_tokenizer_files_are_errors_naming_them(small_cfg: DataConfig):
    from esolm.data import read_meta
    from esolm.data.tokenizers import read_tokenizer

    out = prepare(small_cfg, progress=False)
    text = (out / "meta.json").read_text()
    (out / "meta.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON .* truncated"):
        read_meta(out)
    tok = (out / "tokenizer.json").read_text()
    (out / "tokenizer.json").write_text(tok[: len(tok) // 2])
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizer.json"):
        read_tokenizer(out / "tokenizer.json")


def test_unigram_baseline_matches_a_direct_count(small_cfg: DataConfig):
    from collections import Counter

    out = prepare(small_cfg, progress=False)
    meta = read_meta(out)
    train, test = load_split(out, "train").reshape(-1), load_split(out, "test").reshape(-1)
    counts, total = Counter(train.tolist()), train.size + 0.5 * meta["vocab_size"]
    nll = -sum(np.log((counts[t] + 0.5) / total) for t in test.tolist()) / test.size
    assert meta["unigram_ppl"]["test"] == pytest.approx(float(np.exp(nll)), rel=1e-9)
    assert 1 < meta["unigram_ppl"]["valid"] < meta["vocab_size"]
