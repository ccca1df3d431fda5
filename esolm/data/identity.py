"""Which tokenizer made the data, and checks that data, model files and judges agree on it.

``esolm prepare`` records the sha256 of the ``tokenizer.json`` it wrote in ``meta.json``
(``tokenizer_sha256``); a model file embeds the tokenizer it was trained with and its sha256
(``esolm.checkpoint``). Every stage that reads shards with a model checks, before it reads
anything else, that the tokenizer file still is the one the shards were made with (it parses
and its sha256 matches), that the shards' ids lie in the vocabulary, and that the model (and the
judge) were trained with that same tokenizer: a vocabulary of the same size is not enough.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

CHUNK = 1 << 24  # ids read per step when scanning a shard


def text_sha256(text: str) -> str:
    """The sha256 of a tokenizer's JSON text (UTF-8): the tokenizer's identity."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_tokenizer(data_dir: Path, meta: dict) -> tuple[str, str]:
    """(text, sha256) of ``data_dir/tokenizer.json``, checked: it parses, and it is the file the
    shards were made with (``meta.json``'s ``tokenizer_sha256``, where prepare recorded it)."""
    from tokenizers import Tokenizer

    path = Path(data_dir) / "tokenizer.json"
    redo = "prepare the data again (esolm prepare, or dvc repro -f prepare)"
    try:
        text = path.read_text(encoding="utf-8")
        Tokenizer.from_str(text)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {redo}") from None
    except Exception as err:  # undecodable text, or tokenizers' plain Exception for bad JSON
        raise ValueError(f"{path} is not a valid tokenizer ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else 'unreadable'}): {redo}") from None
    sha = text_sha256(text)
    recorded = meta.get("tokenizer_sha256")
    if recorded is not None and recorded != sha:
        raise ValueError(f"{path} has sha256 {sha[:12]}, but the shards of {data_dir} were made with "
                         f"{recorded[:12]} (meta.json): the file was changed or swapped; {redo}")
    return text, sha


def check_ids(data_dir: Path, meta: dict) -> None:
    """Every id of every split lies in [0, vocab_size) or is the pad id: a shard written with
    another vocabulary is refused naming the file, the id and the fix."""
    from esolm.data.batches import load_split

    top = meta["vocab_size"] - 1 if meta.get("pad_id") is None else max(meta["vocab_size"] - 1, meta["pad_id"])
    for split in meta["splits"]:
        ids = np.asarray(load_split(data_dir, split)).reshape(-1)
        for start in range(0, ids.size, CHUNK):
            hi = int(ids[start:start + CHUNK].max(initial=0))
            if hi > top:
                raise ValueError(f"{Path(data_dir) / f'{split}.bin'} holds id {hi}, outside the vocabulary of "
                                 f"{meta['vocab_size']} ids of meta.json: the shards and meta.json come from "
                                 "different tokenizers; prepare the data again (esolm prepare)")


def check_prepared(data_dir: Path) -> str:
    """Check a prepared folder (tokenizer and ids) and return its tokenizer's sha256."""
    from esolm.data.batches import read_meta

    meta = read_meta(data_dir)
    _, sha = data_tokenizer(data_dir, meta)
    check_ids(data_dir, meta)
    return sha


def same_tokenizer(what: str, sha: str | None, data_dir: Path, data_sha: str) -> None:
    """Refuse ``what`` (a model file, a judge) trained with another tokenizer than the shards'."""
    if sha is not None and sha != data_sha:
        raise ValueError(f"{what} was trained with tokenizer {sha[:12]}, but {data_dir} was made with "
                         f"tokenizer {data_sha[:12]}: its numbers on these shards would mean nothing; "
                         "retrain it on these shards, or point data: at the shards it was trained on")


def tokenizers_agree(what: str, model, other_what: str, other) -> None:
    """Refuse two esolm models (a judge and a contestant) trained with different tokenizers."""
    a = getattr(model, "provenance", {}).get("tokenizer_sha256")
    b = getattr(other, "provenance", {}).get("tokenizer_sha256")
    if a is not None and b is not None and a != b:
        raise ValueError(f"{what} was trained with tokenizer {a[:12]} and {other_what} "
                         f"({other.provenance.get('path')}) with {b[:12]}: its scores would compare "
                         "different token streams; train the judge on the contestants' data (dvc repro judge)")
