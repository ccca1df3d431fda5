"""The one decode helper: Gumbel-max on float32 logits with float64 noise, optional nucleus."""

from __future__ import annotations

import torch
from torch import Tensor


def nucleus_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``; others get -inf.
    logits: [..., V] float32 -> same shape."""
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(logits: Tensor, generator: torch.Generator | None, top_p: float = 1.0) -> Tensor:
    """Draw one token per row of ``logits`` [..., V] by Gumbel-max: argmax(logits + G),
    G = -log(-log U) in float64 (never on reduced-precision logits). Returns [...] ids."""
    logits = nucleus_filter(logits.float(), top_p)
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64)
    log_e = u.clamp_min_(1e-300).log_().neg_().log_()  # log(-log U) = -G, in place (float64)
    return torch.argmax(logits.double() - log_e.to(logits.device), dim=-1)
