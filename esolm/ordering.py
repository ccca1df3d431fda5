"""Permutations: the order in which the model sees (training) or generates (sampling) positions."""

from __future__ import annotations

import torch
from torch import Tensor


def clean_first_order(masked: Tensor, clean_key: Tensor, mask_key: Tensor) -> Tensor:
    """sort_idx [B, L]: clean positions first ordered by ``clean_key``, then masked ones by ``mask_key``.

    masked: bool [B, L]; keys: float [B, L] in [0, 1) (random draws for a uniformly random
    order, ``position / L`` for left to right).
    """
    key = torch.where(masked, 2.0 + mask_key, clean_key)
    return torch.argsort(key, dim=-1, stable=True)


def left_to_right_key(batch: int, length: int, device: torch.device) -> Tensor:
    """Keys that sort positions left to right: position / L, [B, L]."""
    return (torch.arange(length, device=device) / length).expand(batch, length)
