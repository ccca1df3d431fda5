"""Independent random streams from one user seed.

Two generators seeded alike on one device replay the same stream, so draws meant to be
independent (the sampling order and the token noise, say) become functions of each other
(method.md section 7). Every stream therefore gets its own seed, derived from the user's
seed and the stream's name by a hash: streams are independent, yet reproducible.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *stream: object) -> int:
    """A 63-bit seed for the stream named by ``stream`` (e.g. ``("sample", "order")``)."""
    text = ":".join(str(s) for s in (int(seed), *stream))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def stream_generator(seed: int, *stream: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *stream)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *stream))
