"""The corpus every source gives: documents per split (train / valid / test) and the checksums
of what they were read from; the seeded split of a source without splits of its own.

A leaf of ``esolm/data``: the local sources (``local.py``), the hub sources (``hub.py``) and the
dispatcher (``sources.py``) all build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    """Documents per split and what they were read from.

    splits: 'train' | 'valid' | 'test' -> a sequence of documents (a list, or a lazy view of a
    ``datasets`` column). inputs: name of every input -> 'sha256:<hex>' (or, for ``datasets``
    tables, 'fingerprint:<hex>', their content fingerprint).
    """

    splits: dict[str, Sequence[str]]
    inputs: dict[str, str]


def split_documents(docs: Sequence[str], fractions: tuple, seed: int) -> dict[str, list[str]]:
    """Split documents into train / valid / test by a seeded permutation.

    Each split keeps at least one document and the corpus order within it; the same
    (documents, fractions, seed) always give the same split.
    """
    n = len(docs)
    if n < 3:
        raise ValueError(
            f"the corpus has {n} non-empty document(s) but train/valid/test need at least 3: "
            "add documents or point the source at a larger corpus"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = min(max(1, round(n * fractions[1])), n - 2)
    n_test = min(max(1, round(n * fractions[2])), n - 1 - n_valid)
    parts = {"valid": perm[:n_valid], "test": perm[n_valid:n_valid + n_test],
             "train": perm[n_valid + n_test:]}
    return {s: [docs[i] for i in np.sort(parts[s])] for s in SPLITS}
