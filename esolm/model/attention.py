"""One attention function, several backends: ``attention(q, k, v, mask, backend)``.

The masks are ``esolm.model.masks`` (``AttentionMask``); this module runs them: ``math`` (the
reference), ``sdpa`` (PyTorch's fused kernels; plain and cached causal masks need no dense
mask), ``flex`` (flex attention's block masks; compiled once on a GPU) and ``flash`` (a
FlashAttention kernel where the mask allows, else sdpa). ``prebuild`` makes the mask a
backend needs once per forward, not once per layer.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from esolm.device import is_accelerator
from esolm.model.masks import MASK_KINDS, AttentionMask, MaskFn, dense_mask, mask_function, tail_mask

BACKENDS = ("sdpa", "math", "flex", "flash")
CUDA_ONLY_BACKENDS = ("flash",)  # flex runs on CPU too (eager or compiled)



def prebuild(mask: AttentionMask, batch: int, n_q: int, n_kv: int, device: torch.device,
             backend: str) -> AttentionMask:
    """Build the mask once per forward (not once per layer) where the backend needs one: the
    dense boolean mask, or flex attention's block mask (where flex will run: on a GPU, or
    without autograd; a CPU training step runs sdpa with the dense mask instead)."""
    if backend == "flex":
        if is_accelerator(device) or not torch.is_grad_enabled():
            return replace(mask, block_mask=_block_mask(mask, batch, n_q, n_kv, device))
        return mask
    if _is_plain(mask, n_q, n_kv):
        return mask
    block = _tail_block(mask, n_q, n_kv)
    if block == 1 and backend in ("sdpa", "flash") and (n_q == 1 or is_accelerator(device)):
        return mask  # a causal decode step: attention() needs no mask for it (``_causal_tail_sdpa``)
    if block:
        return replace(mask, dense=tail_mask(block, n_q, n_kv, device))
    return replace(mask, dense=dense_mask(mask, batch, n_q, n_kv, device))


def _tail_block(mask: AttentionMask, n_q: int, n_kv: int) -> int:
    """Block size b when the queries are the last n_q of the keys (a KV-cached decode step)
    under a causal (b = 1) or block-causal mask with block-aligned queries; else 0."""
    if mask.keep is not None or mask.q_offset + n_q != n_kv:
        return 0
    if mask.kind == "causal":
        return 1
    if mask.kind == "block_causal" and mask.q_offset % mask.block == 0:
        return mask.block
    return 0


def _dense(mask: AttentionMask, batch: int, n_q: int, n_kv: int, device: torch.device) -> Tensor:
    if mask.dense is not None and mask.dense.shape[-2:] == (n_q, n_kv):
        return mask.dense
    return dense_mask(mask, batch, n_q, n_kv, device)


def _math(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _is_plain(mask: AttentionMask, n_q: int, n_kv: int) -> bool:
    """Full, or causal with queries and keys aligned (sdpa's is_causal fast path)."""
    if mask.keep is not None:
        return False
    return mask.kind == "full" or (mask.kind == "causal" and mask.q_offset == 0 and n_q == n_kv)


_FLEX_CACHE: dict[tuple, object] = {}
_COMPILED: dict[str, Callable] = {}


def _block_mask(mask: AttentionMask, batch: int, n_q: int, n_kv: int, device: torch.device):
    """flex attention's ``BlockMask`` of ``mask`` for these shapes. Masks equal for every row
    and without an offset (training shapes) are kept and reused across forwards."""
    from torch.nn.attention.flex_attention import create_block_mask

    fn = mask_function(mask)
    off = mask.q_offset
    rows = batch if mask.per_row else None

    def mask_mod(b, h, qi, kvi):
        return fn(b, qi + off, kvi)

    key = (mask.kind, mask.block, mask.half, mask.inner, off, n_q, n_kv, str(device))
    reuse = not mask.per_row and off == 0  # decode steps change every call
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


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    block_mask = mask.block_mask
    if block_mask is None:  # a direct call: built here
        block_mask = _block_mask(mask, q.shape[0], q.shape[-2], k.shape[-2], q.device)
    return _flex_kernel(q.device)(q, k, v, block_mask=block_mask)


@functools.cache
def _flash_attn_func():
    """flash-attn's ``flash_attn_func`` when the package is installed, else None (looked up once:
    a failed import costs ~30 us, and ``_flash`` runs in every layer of every step)."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor | None:
    """A FlashAttention kernel where the mask allows it: full, aligned causal, and the causal
    tail of a cached decode step (the queries are the last n_q keys; the causal diagonal is
    then aligned bottom-right). flash-attn when installed (its causal mask is bottom-right
    aligned), else SDPA's own flash kernel. None means: not a flash case, use sdpa."""
    n_q, n_kv = q.shape[-2], k.shape[-2]
    if q.dtype not in (torch.float16, torch.bfloat16) or not is_accelerator(q.device) or mask.dense is not None:
        return None
    tail = _tail_block(mask, n_q, n_kv) == 1
    if not (_is_plain(mask, n_q, n_kv) or tail):
        return None
    causal = mask.kind == "causal" and n_q > 1  # one query at the tail sees every key
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


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, backend: str = "sdpa") -> Tensor:
    """Masked scaled dot-product attention.

    q: [B, H, n_q, D]; k, v: [B, H, n_kv, D]; returns [B, H, n_q, D]. Query i has absolute
    index ``mask.q_offset + i``; key j has absolute index j.
    """
    n_q, n_kv = q.shape[-2], k.shape[-2]
    if backend in CUDA_ONLY_BACKENDS and not is_accelerator(q.device):
        _warn_once(f"attention backend {backend!r} needs CUDA tensors (got {q.device}); using sdpa")
        backend = "sdpa"
    if backend == "flex" and mask.dense is not None:  # a static-cache mask: only dense form
        backend = "sdpa"
    if backend == "flex":
        if is_accelerator(q.device) or not torch.is_grad_enabled() or not (
                q.requires_grad or k.requires_grad or v.requires_grad):
            return _flex(q, k, v, mask)
        # torch's flex attention has no backward on CPU: same mask function, dense, via sdpa
        _warn_once("flex attention has no backward on CPU; training steps use sdpa with the same mask")
        backend = "sdpa"
    if backend == "flash":
        out = _flash(q, k, v, mask)
        if out is not None:
            return out
        backend = "sdpa"
    if backend == "sdpa":
        if _is_plain(mask, n_q, n_kv):
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask.kind == "causal")
        if mask.dense is None and _tail_block(mask, n_q, n_kv) == 1:  # a cached causal decode step
            if n_q == 1:  # the one query is the last key: it sees every key, no mask at all
                return F.scaled_dot_product_attention(q, k, v)
            if is_accelerator(q.device):
                return _causal_tail_sdpa(q, k, v)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_dense(mask, q.shape[0], n_q, n_kv, q.device)
        )
    if backend == "math":
        plain_full = _is_plain(mask, n_q, n_kv) and mask.kind == "full"
        allowed = None if plain_full else _dense(mask, q.shape[0], n_q, n_kv, q.device)
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


def check_backend(backend: str) -> None:
    """At model construction: one warning when ``flash`` has no FlashAttention kernel here
    (neither the flash-attn package nor SDPA's flash kernel); it then runs as sdpa."""
    if backend == "flash" and not flash_available() and not sdpa_flash_available():
        _warn_once("attn_backend 'flash': neither the flash-attn package nor SDPA's flash kernel is "
                   "available in this torch build; attention runs as sdpa (install esolm[flash] "
                   "or a CUDA build of torch)")


__all__ = [
    "BACKENDS",
    "MASK_KINDS",
    "AttentionMask",
    "MaskFn",
    "attention",
    "dense_mask",
    "mask_function",
    "prebuild",
    "tail_mask",
]
