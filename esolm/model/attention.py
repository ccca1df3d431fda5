"""One attention function, several backends, and every attention mask of the project.

Each mask is written once, as a function ``allowed(b, q, kv) -> bool`` over broadcastable
integer index tensors (b: batch row, q: query index, kv: key index, all *absolute* indices
in the sequence the keys live in, so a KV-cached chunk of queries simply starts at
``q_offset``). The same function serves the dense boolean masks of the ``math`` and ``sdpa``
backends and the ``mask_mod`` of ``flex_attention``. The masks (method.md section 3):

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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from esolm.device import is_accelerator

MASK_KINDS = ("causal", "full", "prefix", "block_causal", "two_stream")
BACKENDS = ("sdpa", "math", "flex", "flash")
CUDA_ONLY_BACKENDS = ("flash",)  # flex runs on CPU too (eager or compiled)

MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class MaskSpec:
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


def _inner(kind: str, spec: MaskSpec, b: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    if kind == "causal":
        return kv <= q
    if kind == "full":
        return torch.ones_like(kv <= q)
    if kind == "prefix":
        return (kv <= q) | (kv < spec.n_clean[b])
    if kind == "block_causal":
        return torch.div(kv, spec.block, rounding_mode="floor") <= torch.div(
            q, spec.block, rounding_mode="floor"
        )
    raise ValueError(kind)


def mask_function(spec: MaskSpec) -> MaskFn:
    """The mask of ``spec`` as ``allowed(b, q, kv)`` on broadcastable absolute indices."""
    base = _structure(spec)
    if spec.keep is None:
        return base
    keep = spec.keep
    return lambda b, q, kv: base(b, q, kv) & (keep[b, kv] | (kv == q))


def _structure(spec: MaskSpec) -> MaskFn:
    if spec.kind != "two_stream":
        return lambda b, q, kv: _inner(spec.kind, spec, b, q, kv)
    half, blk = spec.half, spec.block

    def allowed(b: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        q_noisy, kv_noisy = q < half, kv < half
        qb = torch.div(q % half, blk, rounding_mode="floor")
        kb = torch.div(kv % half, blk, rounding_mode="floor")
        noisy_row = torch.where(kv_noisy, qb == kb, kb < qb)
        clean_row = ~kv_noisy & _inner(spec.inner, spec, b, q - half, kv - half)
        return torch.where(q_noisy, noisy_row, clean_row)

    return allowed


def dense_mask(spec: MaskSpec, batch: int, n_q: int, n_kv: int, device: torch.device) -> Tensor:
    """Boolean mask [B or 1, 1, n_q, n_kv]; True where attention is allowed."""
    rows = batch if spec.per_row else 1
    b = torch.arange(rows, device=device).view(rows, 1, 1, 1)
    q = (torch.arange(n_q, device=device) + spec.q_offset).view(1, 1, n_q, 1)
    kv = torch.arange(n_kv, device=device).view(1, 1, 1, n_kv)
    return mask_function(spec)(b, q, kv).expand(rows, 1, n_q, n_kv)


def prebuild(spec: MaskSpec, batch: int, n_q: int, n_kv: int, device: torch.device,
             backend: str) -> MaskSpec:
    """Build the mask once per forward (not once per layer) where the backend needs one: the
    dense boolean mask, or flex attention's block mask (where flex will run: on a GPU, or
    without autograd; a CPU training step runs sdpa with the dense mask instead)."""
    if backend == "flex":
        if is_accelerator(device) or not torch.is_grad_enabled():
            return replace(spec, block_mask=_block_mask(spec, batch, n_q, n_kv, device))
        return spec
    if _is_plain(spec, n_q, n_kv):
        return spec
    block = _tail_block(spec, n_q, n_kv)
    if block == 1 and backend in ("sdpa", "flash") and (n_q == 1 or is_accelerator(device)):
        return spec  # a causal decode step: attention() needs no mask for it (``_causal_tail_sdpa``)
    if block:
        return replace(spec, dense=tail_mask(block, n_q, n_kv, device))
    return replace(spec, dense=dense_mask(spec, batch, n_q, n_kv, device))


def _tail_block(spec: MaskSpec, n_q: int, n_kv: int) -> int:
    """Block size b when the queries are the last n_q of the keys (a KV-cached decode step)
    under a causal (b = 1) or block-causal mask with block-aligned queries; else 0."""
    if spec.keep is not None or spec.q_offset + n_q != n_kv:
        return 0
    if spec.kind == "causal":
        return 1
    if spec.kind == "block_causal" and spec.q_offset % spec.block == 0:
        return spec.block
    return 0


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


def _dense(spec: MaskSpec, batch: int, n_q: int, n_kv: int, device: torch.device) -> Tensor:
    if spec.dense is not None and spec.dense.shape[-2:] == (n_q, n_kv):
        return spec.dense
    return dense_mask(spec, batch, n_q, n_kv, device)


def _math(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _is_plain(spec: MaskSpec, n_q: int, n_kv: int) -> bool:
    """Full, or causal with queries and keys aligned (sdpa's is_causal fast path)."""
    if spec.keep is not None:
        return False
    return spec.kind == "full" or (spec.kind == "causal" and spec.q_offset == 0 and n_q == n_kv)


_FLEX_CACHE: dict[tuple, object] = {}
_COMPILED: dict[str, Callable] = {}


def _block_mask(spec: MaskSpec, batch: int, n_q: int, n_kv: int, device: torch.device):
    """flex attention's ``BlockMask`` of ``spec`` for these shapes. Masks equal for every row
    and without an offset (training shapes) are kept and reused across forwards."""
    from torch.nn.attention.flex_attention import create_block_mask

    fn = mask_function(spec)
    off = spec.q_offset
    rows = batch if spec.per_row else None

    def mask_mod(b, h, qi, kvi):
        return fn(b, qi + off, kvi)

    key = (spec.kind, spec.block, spec.half, spec.inner, off, n_q, n_kv, str(device))
    reuse = not spec.per_row and off == 0  # decode steps change every call
    block_mask = _FLEX_CACHE.get(key) if reuse else None
    if block_mask is None:
        block_mask = create_block_mask(mask_mod, rows, None, n_q, n_kv, device=device)
        if reuse:
            if len(_FLEX_CACHE) >= 64:
                _FLEX_CACHE.clear()
            _FLEX_CACHE[key] = block_mask
    return block_mask


def _flex_kernel(device: torch.device) -> Callable:
    """flex attention compiled once per process on a GPU (fused, no score matrix); eager on a
    CPU, where compiling costs more than the small models there gain."""
    from torch.nn.attention.flex_attention import flex_attention

    if not is_accelerator(device):
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _flex(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec) -> Tensor:
    block_mask = spec.block_mask
    if block_mask is None:  # a direct call: built here
        block_mask = _block_mask(spec, q.shape[0], q.shape[-2], k.shape[-2], q.device)
    return _flex_kernel(q.device)(q, k, v, block_mask=block_mask)


def _flash_attn_func():
    """flash-attn's ``flash_attn_func`` when the package is installed, else None."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


def _flash(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec) -> Tensor | None:
    """A FlashAttention kernel where the mask allows it: full, aligned causal, and the causal
    tail of a cached decode step (the queries are the last n_q keys; the causal diagonal is
    then aligned bottom-right). flash-attn when installed (its causal mask is bottom-right
    aligned), else SDPA's own flash kernel. None means: not a flash case, use sdpa."""
    n_q, n_kv = q.shape[-2], k.shape[-2]
    if q.dtype not in (torch.float16, torch.bfloat16) or not is_accelerator(q.device) or spec.dense is not None:
        return None
    tail = _tail_block(spec, n_q, n_kv) == 1
    if not (_is_plain(spec, n_q, n_kv) or tail):
        return None
    causal = spec.kind == "causal" and n_q > 1  # one query at the tail sees every key
    func = _flash_attn_func()
    if func is not None:
        return func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    if not sdpa_flash_available():
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if causal and n_q != n_kv:
        return _causal_tail_sdpa(q, k, v)  # CausalBias dispatches to the flash kernel itself
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _causal_tail_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last n_q of n_kv keys without a dense mask (bottom-right
    aligned causal bias: flash or memory-efficient kernels on a GPU)."""
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]))


def attention(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, backend: str = "sdpa") -> Tensor:
    """Masked scaled dot-product attention.

    q: [B, H, n_q, D]; k, v: [B, H, n_kv, D]; returns [B, H, n_q, D]. Query i has absolute
    index ``spec.q_offset + i``; key j has absolute index j.
    """
    n_q, n_kv = q.shape[-2], k.shape[-2]
    if backend in CUDA_ONLY_BACKENDS and not is_accelerator(q.device):
        _warn_once(f"attention backend {backend!r} needs CUDA tensors (got {q.device}); using sdpa")
        backend = "sdpa"
    if backend == "flex" and spec.dense is not None:  # a static-cache mask: only dense form
        backend = "sdpa"
    if backend == "flex":
        if is_accelerator(q.device) or not torch.is_grad_enabled() or not (
                q.requires_grad or k.requires_grad or v.requires_grad):
            return _flex(q, k, v, spec)
        # torch's flex attention has no backward on CPU: same mask function, dense, via sdpa
        _warn_once("flex attention has no backward on CPU; training steps use sdpa with the same mask")
        backend = "sdpa"
    if backend == "flash":
        out = _flash(q, k, v, spec)
        if out is not None:
            return out
        backend = "sdpa"
    if backend == "sdpa":
        if _is_plain(spec, n_q, n_kv):
            return F.scaled_dot_product_attention(q, k, v, is_causal=spec.kind == "causal")
        if spec.dense is None and _tail_block(spec, n_q, n_kv) == 1:  # a cached causal decode step
            if n_q == 1:  # the one query is the last key: it sees every key, no mask at all
                return F.scaled_dot_product_attention(q, k, v)
            if is_accelerator(q.device):
                return _causal_tail_sdpa(q, k, v)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_dense(spec, q.shape[0], n_q, n_kv, q.device)
        )
    if backend == "math":
        plain_full = _is_plain(spec, n_q, n_kv) and spec.kind == "full"
        allowed = None if plain_full else _dense(spec, q.shape[0], n_q, n_kv, q.device)
        return _math(q, k, v, allowed)
    raise ValueError(f"attention backend {backend!r} is unknown; use one of {BACKENDS}")


def varying_shape_kernels():
    """SDPA's kernels for calls whose sequence lengths change from one call to the next (every
    cached decode step, a growing prefix): all but cuDNN's. cuDNN attention builds an execution
    plan per new shape, about 70 ms each on an H200 (reports/gpu/probe/probe.jsonl: an AR decode step
    at L = 2048 took 80-85 ms on first sight of its length with cuDNN, 10.8 ms without), so a
    dynamic decode, with a new length every step, paid it every step. A no-op on CPUs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def flash_available() -> bool:
    """Whether the flash-attn package is installed."""
    return _flash_attn_func() is not None


def sdpa_flash_available() -> bool:
    """Whether this torch build has SDPA's FlashAttention kernel (CUDA builds)."""
    probe = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return bool(probe()) if probe is not None else False


def check_backend(backend: str, device: torch.device | None = None) -> None:
    """At model construction: one warning when ``flash`` has no FlashAttention kernel here
    (neither the flash-attn package nor SDPA's flash kernel); it then runs as sdpa."""
    if backend == "flash" and not flash_available() and not sdpa_flash_available():
        _warn_once("attn_backend 'flash': neither the flash-attn package nor SDPA's flash kernel is "
                   "available in this torch build; attention runs as sdpa (install esolm[flash] "
                   "or a CUDA build of torch)")
