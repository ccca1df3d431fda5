"""Every attention mask of the project, and the named mask factories of the families.

Each mask is written once, as a function ``allowed(b, q, kv) -> bool`` over broadcastable
integer index tensors (b: batch row, q: query index, kv: key index, all *absolute* indices
in the sequence the keys live in, so a KV-cached chunk of queries simply starts at
``q_offset``). The same function serves the dense boolean masks of the ``math`` and ``sdpa``
backends and the ``mask_mod`` of ``flex_attention`` (``esolm.model.attention``). The masks
(method.md section 3):

- ``causal``: kv <= q.
- ``full``: everything (bidirectional).
- ``prefix``: kv <= q or kv < n_clean[b]. Over a permuted sequence whose first n_clean[b]
  tokens are clean this is both the Eso-LM (A) diffusion mask (bidirectional among clean
  tokens, masks causal) and the prefix-LM half of the Eso-LM (A) sequential mask.
- ``block_causal``: kv // block <= q // block (BD3-LM over the clean sequence and its cache).
- ``two_stream``: the 2L mask over ``[noisy ; clean]`` (each of length L = ``half``).
  Noisy query q attends to its own block of the noisy half and to clean blocks strictly
  before its block; clean queries attend within the clean half by ``inner`` (causal for
  Eso-LM (B), prefix for Eso-LM (A), block_causal for BD3-LM). With block 1 it is the
  Eso-LM sequential mask; with block L' it is the BD3-LM block-diffusion mask.

A family's record (``esolm.families``) names its masks; ``clean_mask`` and ``two_stream_mask``
build them for a config (the named factories ``CLEAN`` and ``TWO_STREAM``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from esolm.config import ModelConfig

MASK_KINDS = ("causal", "full", "prefix", "block_causal", "two_stream")

MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """Which keys each query may see.

    kind: one of ``MASK_KINDS``; block: block size for block_causal / two_stream;
    n_clean: LongTensor[B] of clean-prefix lengths (prefix masks); half: L for two_stream;
    inner: the clean-half mask of two_stream; q_offset: absolute index of the first query
    (the number of cached keys before it when decoding with a KV cache); keep: optional
    bool [B, n_kv], False for padding keys, which no other query may see; dense: the
    boolean mask already built for these shapes (``prebuild``), reused by every layer;
    block_mask: flex attention's ``BlockMask`` built once per forward (``prebuild``), likewise.
    """

    kind: str
    block: int = 1
    n_clean: Tensor | None = None
    half: int = 0
    inner: str = "causal"
    q_offset: int = 0
    keep: Tensor | None = None
    dense: Tensor | None = None
    block_mask: object | None = None

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind {self.kind!r} is unknown; use one of {MASK_KINDS}")
        if self.kind == "two_stream" and self.inner not in ("causal", "prefix", "block_causal"):
            raise ValueError(f"two_stream inner mask {self.inner!r} must be causal, prefix or block_causal")
        needs_clean = self.kind == "prefix" or (self.kind == "two_stream" and self.inner == "prefix")
        if needs_clean and self.n_clean is None:
            raise ValueError(f"mask {self.kind!r} needs n_clean (clean tokens per row)")
        if self.kind == "two_stream" and self.half < 1:
            raise ValueError("two_stream mask needs half = L >= 1")
        if self.block < 1:
            raise ValueError(f"block size must be >= 1, got {self.block}")

    @property
    def per_row(self) -> bool:
        """Whether the mask differs between batch rows."""
        return self.keep is not None or (
            self.n_clean is not None and (self.kind == "prefix" or self.inner == "prefix"))


def _inner(kind: str, mask: AttentionMask, b: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    if kind == "causal":
        return kv <= q
    if kind == "full":
        return torch.ones_like(kv <= q)
    if kind == "prefix":
        return (kv <= q) | (kv < mask.n_clean[b])
    if kind == "block_causal":
        return torch.div(kv, mask.block, rounding_mode="floor") <= torch.div(
            q, mask.block, rounding_mode="floor"
        )
    raise ValueError(kind)


def mask_function(mask: AttentionMask) -> MaskFn:
    """The mask of ``mask`` as ``allowed(b, q, kv)`` on broadcastable absolute indices."""
    base = _structure(mask)
    if mask.keep is None:
        return base
    keep = mask.keep
    return lambda b, q, kv: base(b, q, kv) & (keep[b, kv] | (kv == q))


def _structure(mask: AttentionMask) -> MaskFn:
    if mask.kind != "two_stream":
        return lambda b, q, kv: _inner(mask.kind, mask, b, q, kv)
    half, blk = mask.half, mask.block

    def allowed(b: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        q_noisy, kv_noisy = q < half, kv < half
        qb = torch.div(q % half, blk, rounding_mode="floor")
        kb = torch.div(kv % half, blk, rounding_mode="floor")
        noisy_row = torch.where(kv_noisy, qb == kb, kb < qb)
        clean_row = ~kv_noisy & _inner(mask.inner, mask, b, q - half, kv - half)
        return torch.where(q_noisy, noisy_row, clean_row)

    return allowed


def dense_mask(mask: AttentionMask, batch: int, n_q: int, n_kv: int, device: torch.device) -> Tensor:
    """Boolean mask [B or 1, 1, n_q, n_kv]; True where attention is allowed."""
    rows = batch if mask.per_row else 1
    b = torch.arange(rows, device=device).view(rows, 1, 1, 1)
    q = (torch.arange(n_q, device=device) + mask.q_offset).view(1, 1, n_q, 1)
    kv = torch.arange(n_kv, device=device).view(1, 1, 1, n_kv)
    return mask_function(mask)(b, q, kv).expand(rows, 1, n_q, n_kv)


_BANDS: dict[tuple[torch.device, int], Tensor] = {}


def tail_mask(block: int, n_q: int, n_kv: int, device: torch.device) -> Tensor:
    """The block-causal mask [n_q, n_kv] (block 1: causal) of the last n_q of n_kv keys, as a
    view of one cached band, so that a decode step allocates no mask.

    band[i, c] = (c - W) // block <= i // block for i < Q, c < W + Q, with W a multiple of
    block; the view starts at column W - (n_kv - n_q) (a multiple of block, as the queries
    start on a block boundary). The band grows (powers of two) when a step needs more.
    """
    key = (device, block)
    band = _BANDS.get(key)
    start = n_kv - n_q
    if band is None or band.shape[0] < n_q or band.shape[1] - band.shape[0] < start:
        old_q, old_w = (0, 0) if band is None else (band.shape[0], band.shape[1] - band.shape[0])
        Q = max(8, 1 << (n_q - 1).bit_length(), old_q)
        W = max(1024, 1 << max(start - 1, 0).bit_length(), old_w)
        W = -(-W // block) * block
        i = torch.arange(Q, device=device)[:, None]
        c = torch.arange(W + Q, device=device)[None, :]
        band = torch.div(c - W, block, rounding_mode="floor") <= torch.div(i, block, rounding_mode="floor")
        _BANDS[key] = band
    W = band.shape[1] - band.shape[0]
    return band[:n_q].narrow(1, W - start, n_kv)


# ----------------------------------------------------------------------------- named factories

def _causal(cfg: ModelConfig, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("causal")


def _full(cfg: ModelConfig, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("full", keep=keep)


def _prefix(cfg: ModelConfig, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("prefix", n_clean=n_clean)


def _block_causal(cfg: ModelConfig, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("block_causal", block=cfg.block_size)


def _two_causal(cfg: ModelConfig, half: int, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("two_stream", half=half, inner="causal")


def _two_prefix(cfg: ModelConfig, half: int, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("two_stream", half=half, inner="prefix", n_clean=n_clean)


def _two_blocks(cfg: ModelConfig, half: int, n_clean: Tensor | None, keep: Tensor | None) -> AttentionMask:
    return AttentionMask("two_stream", block=cfg.block_size, half=half, inner="block_causal", keep=keep)


CLEAN: dict[str, Callable[..., AttentionMask]] = {
    "causal": _causal, "full": _full, "prefix": _prefix, "block_causal": _block_causal}
"""One pass over the (permuted) clean sequence: (cfg, n_clean, keep) -> AttentionMask."""
TWO_STREAM: dict[str, Callable[..., AttentionMask]] = {
    "causal": _two_causal, "prefix": _two_prefix, "block_causal": _two_blocks}
"""The two-stream ``[z ; x]`` pass, by its clean half's mask: (cfg, half, n_clean, keep) -> AttentionMask."""


def clean_mask(cfg: ModelConfig, n_clean: Tensor | None = None, keep: Tensor | None = None) -> AttentionMask:
    """The family's mask of one pass over the (permuted) sequence: n_clean [B] clean tokens
    first (prefix masks), keep [B, L] False for padding keys."""
    return CLEAN[cfg.family_record.clean_mask](cfg, n_clean, keep)


def two_stream_mask(cfg: ModelConfig, half: int, n_clean: Tensor | None = None,
                    keep: Tensor | None = None) -> AttentionMask:
    """The family's mask of the two-stream pass over ``[z ; x]`` (each half long)."""
    name = cfg.family_record.two_stream_mask
    if name is None:
        raise ValueError(f"family {cfg.family!r} has no two-stream pass")
    return TWO_STREAM[name](cfg, half, n_clean, keep)
