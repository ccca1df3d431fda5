"""Hub sources offline: hf: on local datasets (splits mapped, carved, conventions), no network."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from esolm.data import DataConfig, hub
from esolm.data.sources import load_corpus


def _texts(corpus, split):
    return list(corpus.splits[split][0:len(corpus.splits[split])])


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


def test_hub_split_conventions(monkeypatch):
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"d{i}" for i in range(12)]})
    test = datasets.Dataset.from_dict({"text": ["t0", "t1"]})
    cfg = DataConfig()
    monkeypatch.setattr(hub, "OPENWEBTEXT_VALID_DOCS", 4)
    views = hub._column_views({"train": train}, "text", "openwebtext", cfg)
    assert list(views["valid"][0:4]) == ["d8", "d9", "d10", "d11"] and len(views["train"]) == 8
    assert views["test"] is views["valid"]
    views = hub._column_views({"test": test}, "text", "eval_only", cfg)
    assert all(list(views[s][0:2]) == ["t0", "t1"] for s in ("train", "valid", "test"))
    assert hub.HF_CONVENTIONS["ptb_text_only"].column == "sentence"


def test_a_hub_source_offline_is_one_clear_error(monkeypatch):
    """preset=owt-small on an offline machine used to end in a datasets traceback."""
    from esolm.data.hub import _load_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="needs the Hugging Face hub, which this machine cannot reach"):
        _load_hub("esolm-test/no-such-dataset", None, True, "hf:no-such-dataset")
