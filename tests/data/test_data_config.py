"""DataConfig: defaults, validation messages, from_dict."""

from __future__ import annotations

import pytest

from esolm.data import DataConfig
from esolm.data.config import parse_source, parse_tokenizer


def test_defaults_are_the_embedded_corpus():
    cfg = DataConfig()
    assert (cfg.dataset, cfg.source, cfg.tokenizer, cfg.packing, cfg.length) == (
        "sotu", "sotu", "bpe:2048", "wrap", 64)
    assert cfg.split_fractions == (0.9, 0.05, 0.05) and cfg.allow_network is False
    with pytest.raises(AttributeError):
        cfg.length = 3  # frozen


def test_from_dict_accepts_yaml_lists():
    cfg = DataConfig.from_dict({"tokenizer": "gpt2", "split_fractions": [0.8, 0.1, 0.1]})
    assert cfg.split_fractions == (0.8, 0.1, 0.1) and cfg.tokenizer == "gpt2"


def test_from_dict_suggests_the_closest_key():
    with pytest.raises(ValueError, match=r"'lenght'.*did you mean 'length'"):
        DataConfig.from_dict({"lenght": 128})


@pytest.mark.parametrize("field, value, allowed", [
    ("source", "s3:bucket", "hf:<name>"),
    ("source", "hf:", "files:<glob>"),
    ("tokenizer", "gpt3", "bpe:<vocab_size>"),
    ("tokenizer", "bpe:ten", "bert-base-uncased"),
    ("tokenizer", "bpe:100", "at least 258"),
    ("packing", "stack", "wrap"),
    ("length", 1, ">= 2"),
    ("split_fractions", (0.5, 0.5, 0.5), "sum to 1"),
    ("split_fractions", (1.0, 0.0, 0.0), "positive"),
    ("dataset", "../up", "folder name"),
    ("token_dtype", "int8", "uint32"),
    ("allow_network", "yes", "true or false"),
])
def test_bad_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        DataConfig(**{field: value})
    msg = str(err.value)
    assert f"DataConfig.{field}={value!r}" in msg and allowed in msg


def test_spec_parsers():
    assert parse_source("sotu") == ("sotu", "", None)
    assert parse_source("hf:wikitext:wikitext-2-raw-v1") == ("hf", "wikitext", "wikitext-2-raw-v1")
    assert parse_source("files:a/**/*.txt") == ("files", "a/**/*.txt", None)
    assert parse_tokenizer("bpe:4096") == ("bpe", 4096)
    assert parse_tokenizer("bert-base-uncased") == ("bert-base-uncased", None)
