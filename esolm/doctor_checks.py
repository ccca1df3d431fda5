"""The numeric checks ``esolm doctor`` runs on every attention backend: each mask kind against
the ``math`` backend (values, and gradients where the backend has a backward there)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from esolm.device import is_accelerator
from esolm.model.attention import AttentionMask, flash_available, sdpa_flash_available

OK, FAILED, UNAVAILABLE, NOT_APPLICABLE = "ok", "FAILED", "unavailable", "not applicable"
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest relative error (|got - ref| / max(1, |ref|)) accepted per compute dtype."""
def rel_error(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| / max(1, max |ref|) over finite reference entries; inf when the pattern
    of non-finite entries differs."""
    got, ref = got.detach().double(), ref.detach().double()
    finite = ref.isfinite()
    if not bool((got.isfinite() == finite).all()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    diff = (got - ref)[finite].abs().max()
    return float(diff / ref[finite].abs().max().clamp_min(1.0))


# --------------------------------------------------------------------------- attention backends
def mask_cases(L: int, B: int, device: torch.device) -> list[tuple[str, AttentionMask, int, int]]:
    """(label, mask, n_q, n_kv) for every mask kind of ``MASK_KINDS`` (two_stream with each inner
    mask, over two halves of L // 2), padding keys, and cached decode steps (a block of queries
    after L // 2 cached keys, a single query after L - 1). Three shapes in all, (L, L),
    (L // 2, L) and (1, L), so that a compiled kernel compiles few times. L % 8 == 0."""
    g = torch.Generator().manual_seed(7)
    half = L // 2
    n_clean = torch.randint(0, L + 1, (B,), generator=g).to(device)
    clean_half = torch.randint(0, half + 1, (B,), generator=g).to(device)
    keep, keep_half = ((torch.rand(B, n, generator=g) > 0.3).to(device) for n in (L, half))
    two = dict(kind="two_stream", half=half)
    cases = [("causal", AttentionMask("causal")), ("full", AttentionMask("full")),
             ("prefix", AttentionMask("prefix", n_clean=n_clean)),
             ("block_causal", AttentionMask("block_causal", block=4)),
             ("two_stream/causal", AttentionMask(**two, inner="causal")),
             ("two_stream/prefix", AttentionMask(**two, inner="prefix", n_clean=clean_half)),
             ("two_stream/block4", AttentionMask(**two, block=4, inner="block_causal")),
             ("full+padding", AttentionMask("full", keep=keep)),
             ("two_stream/block4+padding", AttentionMask(**two, block=4, inner="block_causal",
                                                    keep=torch.cat((keep_half, keep_half), 1)))]
    out = [(label, mask, L, L) for label, mask in cases]
    for off in (half, L - 1):
        out += [(f"decode causal@{off}", AttentionMask("causal", q_offset=off), L - off, L),
                (f"decode prefix@{off}", AttentionMask("prefix", n_clean=n_clean, q_offset=off), L - off, L)]
    out.append((f"decode block4@{half}", AttentionMask("block_causal", block=4, q_offset=half), half, L))
    return out


def attention_error(fn: Callable[[Tensor, Tensor, Tensor], Tensor], mask: AttentionMask, n_q: int, n_kv: int,
                    dtype: torch.dtype, device: torch.device, grads: bool, B: int = 2, H: int = 2,
                    D: int = 16, seed: int = 0) -> float:
    """``rel_error`` of ``fn(q, k, v)`` in ``dtype`` against the math backend in float64 on the
    same (dtype-rounded) inputs: the output, and with ``grads`` also dL/dq, dL/dk, dL/dv of
    L = sum(out * w) for random w. q: [B, H, n_q, D]; k, v: [B, H, n_kv, D]."""
    att = importlib.import_module("esolm.model.attention")  # the module (esolm.model exports the function)

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, n_kv, D, generator=g).to(device, dtype) for _ in range(2))
    w = torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64).to(device)

    def run(f: Callable[[Tensor, Tensor, Tensor], Tensor], cast: torch.dtype) -> list[Tensor]:
        ins = [t.detach().to(cast).requires_grad_(grads) for t in (q, k, v)]
        with torch.set_grad_enabled(grads):
            out = f(*ins)
            if not grads:
                return [out]
            return [out, *torch.autograd.grad((out.double() * w).sum(), ins)]

    ref = run(lambda a, b, c: att.attention(a, b, c, mask, "math"), torch.float64)
    return max(rel_error(a, b) for a, b in zip(run(fn, dtype), ref))


def backend_error(backend: str, mask: AttentionMask, n_q: int, n_kv: int, dtype: torch.dtype,
                  device: torch.device, grads: bool, **size: int) -> float:
    """``attention_error`` of ``attention(..., backend)`` (looked up at call time)."""
    att = importlib.import_module("esolm.model.attention")  # the module (esolm.model exports the function)

    return attention_error(lambda a, b, c: att.attention(a, b, c, mask, backend), mask, n_q, n_kv, dtype,
                           device, grads, **size)


def backend_support(backend: str, device: torch.device) -> tuple[bool, bool, str]:
    """(runs here, has a backward here, note) for one attention backend on ``device``."""
    if backend == "flash":
        if not is_accelerator(device):
            return False, False, "needs a CUDA GPU (runs as sdpa here)"
        if not (flash_available() or sdpa_flash_available()):
            return False, False, "neither flash-attn nor SDPA's flash kernel in this build (runs as sdpa)"
        return True, True, "flash-attn" if flash_available() else "SDPA's flash kernel, half precision"
    if backend == "flex" and not is_accelerator(device):
        return True, False, "values only: no flex backward on CPU (training uses sdpa with the same mask)"
    return True, True, ""


