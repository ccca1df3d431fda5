"""Every mask against a dense loop-built reference; every backend against plain math."""

from __future__ import annotations

import pytest
import torch

from esolm.device import pick_device
from esolm.model.attention import AttentionMask, attention, dense_mask, flash_available


def reference_mask(mask: AttentionMask, B: int, n_q: int, n_kv: int) -> torch.Tensor:
    """Independent, loop-based statement of each mask of method.md section 3."""
    out = torch.zeros(B, 1, n_q, n_kv, dtype=torch.bool)
    for b in range(B):
        nc = int(mask.n_clean[b]) if mask.n_clean is not None else None
        for i in range(n_q):
            q = i + mask.q_offset
            for kv in range(n_kv):
                out[b, 0, i, kv] = _allowed(mask, nc, q, kv)
    return out


def _allowed(mask: AttentionMask, nc: int | None, q: int, kv: int) -> bool:
    if mask.kind == "causal":
        return kv <= q
    if mask.kind == "full":
        return True
    if mask.kind == "prefix":  # clean tokens see all clean tokens; masks see clean + earlier masks
        return kv <= q or kv < nc
    if mask.kind == "block_causal":
        return kv // mask.block <= q // mask.block
    L, blk = mask.half, mask.block
    if q < L:  # noisy query: its own noisy block, and clean blocks strictly before it
        if kv < L:
            return kv // blk == q // blk
        return (kv - L) // blk < q // blk
    if kv < L:
        return False
    qc, kc = q - L, kv - L
    inner = AttentionMask(mask.inner, block=blk, n_clean=mask.n_clean)
    return _allowed(inner, nc, qc, kc)


def specs(L: int, B: int, gen: torch.Generator):
    n_clean = torch.randint(0, L + 1, (B,), generator=gen)
    yield AttentionMask("causal")
    yield AttentionMask("full")
    yield AttentionMask("prefix", n_clean=n_clean)  # Eso-LM (A) diffusion
    for blk in [b for b in (1, 2, 4, 8) if L % b == 0]:
        yield AttentionMask("block_causal", block=blk)
        yield AttentionMask("two_stream", block=blk, half=L, inner="block_causal")  # BD3-LM
    yield AttentionMask("two_stream", half=L, inner="causal")  # Eso-LM (B) sequential, block 1
    yield AttentionMask("two_stream", half=L, inner="prefix", n_clean=n_clean)  # Eso-LM (A) sequential


@pytest.mark.parametrize("L", [1, 4, 8, 12])
def test_masks_match_dense_reference(L, gen):
    B = 3
    for mask in specs(L, B, gen):
        n = 2 * L if mask.kind == "two_stream" else L
        got = dense_mask(mask, B, n, n, torch.device("cpu")).expand(B, 1, n, n)
        assert torch.equal(got, reference_mask(mask, B, n, n)), mask.kind


@pytest.mark.parametrize("offset", [1, 5])
def test_masks_with_cached_prefix_match_reference(offset, gen):
    """Queries that start after ``offset`` cached keys (KV-cached decoding)."""
    B, n_q = 2, 4
    n_clean = torch.randint(0, offset + n_q + 1, (B,), generator=gen)
    for mask in (AttentionMask("causal", q_offset=offset), AttentionMask("block_causal", block=2, q_offset=offset),
                 AttentionMask("prefix", n_clean=n_clean, q_offset=offset)):
        got = dense_mask(mask, B, n_q, offset + n_q, torch.device("cpu")).expand(B, 1, n_q, -1)
        assert torch.equal(got, reference_mask(mask, B, n_q, offset + n_q)), mask.kind


def _backends() -> list[str]:
    out = ["sdpa"]
    if torch.cuda.is_available():
        out.append("flex")
        if flash_available():
            out.append("flash")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", _backends())
def test_backends_match_math_with_gradients(backend, dtype, gen):
    """On the GPU when there is one (sdpa included: it was once pinned to the CPU here, so
    sdpa was never compared with math on CUDA), else on the CPU."""
    device = pick_device("auto")
    B, H, D, L = 2, 2, 8, 8
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for mask in specs(L, B, gen):
        n = 2 * L if mask.kind == "two_stream" else L
        mask = AttentionMask(mask.kind, mask.block, None if mask.n_clean is None else mask.n_clean.to(device),
                        mask.half, mask.inner)
        q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=dtype).to(device).requires_grad_()
                   for _ in range(3))
        out = attention(q, k, v, mask, backend)
        ref = attention(q, k, v, mask, "math")
        torch.testing.assert_close(out, ref, **tol)
        w = torch.randn_like(out)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


def test_sdpa_takes_the_causal_fast_path_without_a_dense_mask(monkeypatch):
    import importlib

    att = importlib.import_module("esolm.model.attention")

    def boom(*a, **k):
        raise AssertionError("dense mask built on the causal/full fast path")

    monkeypatch.setattr(att, "dense_mask", boom)
    q = torch.randn(1, 2, 16, 8)
    for kind in ("causal", "full"):
        att.attention(q, q, q, AttentionMask(kind), "sdpa")


def test_bad_mask_specs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown"):
        AttentionMask("sideways")
    with pytest.raises(ValueError, match="n_clean"):
        AttentionMask("prefix")
    with pytest.raises(ValueError, match="half"):
        AttentionMask("two_stream")
    with pytest.raises(ValueError, match="backend"):
        attention(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
                  AttentionMask("full"), "fastest")
