"""Data preparation: corpus sources, tokenizers, token shards on disk and batch iterators.

``prepare(DataConfig(...))`` writes ``<out_dir>/<dataset>/{train,valid,test}.bin``,
``tokenizer.json`` and ``meta.json``; ``Batches`` / ``load_split`` read them back.
"""

from esolm.data.batches import Batches, load_split, read_meta
from esolm.data.config import DataConfig
from esolm.data.prepare import prepare
from esolm.data.tokenizers import load_tokenizer

__all__ = ["Batches", "DataConfig", "load_split", "load_tokenizer", "prepare", "read_meta"]
