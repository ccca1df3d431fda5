"""Tiny corpora written into tmp_path, and a small config pointing at them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from esolm.data import DataConfig

WORDS = ["the", "union", "of", "states", "congress", "people", "nation", "year", "law", "war", "peace", "trade",
         "money", "president", "government", "public", "country", "great", "duty", "power", "treaty", "army", "navy"]


def make_text(rng: random.Random, n_words: int) -> str:
    """A document of ``n_words`` words in sentences, with some non-ASCII and odd whitespace."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    for i in range(0, n_words, 9):
        words[i] = words[i].capitalize()
    text = " ".join(words)
    return text.replace(" Union", ".  Union").replace(" Peace", ".\n\nPeace") + " — café."


def write_txt_corpus(folder: Path, n_docs: int = 40, seed: int = 0, words: tuple = (20, 120)) -> Path:
    """``n_docs`` .txt files (one document each) in ``folder``; returns the folder."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(make_text(rng, rng.randint(*words)), encoding="utf-8")
    return folder


@pytest.fixture
def txt_corpus(tmp_path: Path) -> Path:
    return write_txt_corpus(tmp_path / "docs")


@pytest.fixture
def small_cfg(tmp_path: Path, txt_corpus: Path) -> DataConfig:
    """Files source, BPE with 300 ids, rows of 16 tokens, everything inside tmp_path."""
    return DataConfig(dataset="tiny", source=f"files:{txt_corpus}/*.txt", tokenizer="bpe:300",
                      length=16, out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "raw"))


@pytest.fixture(scope="session")
def network_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One download folder shared by the network-marked tests of a session."""
    return tmp_path_factory.mktemp("raw")
