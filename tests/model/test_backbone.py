"""Backbone: permutation consistency, KV cache against a full forward, causality on the permutation."""

from __future__ import annotations

import pytest
import torch

from esolm.model.attention import AttentionMask
from tests.conftest import sharp_model


def test_permuted_input_with_permuted_rotary_equals_natural_order(gen):
    """With full attention, running on a permuted input with permuted positions and
    un-permuting the outputs equals the natural-order forward."""
    model = sharp_model("mdlm", dtype=torch.float64)
    B, L = 3, 16
    x = torch.randint(0, 7, (B, L), generator=gen)
    perm = torch.stack([torch.randperm(L, generator=gen) for _ in range(B)])
    natural = model(x, torch.arange(L).expand(B, L), AttentionMask("full"))
    permuted = model(x.gather(1, perm), perm, AttentionMask("full"))
    unpermuted = torch.empty_like(permuted).scatter_(1, perm[..., None].expand_as(permuted), permuted)
    torch.testing.assert_close(unpermuted, natural, atol=1e-10, rtol=1e-10)
    # and the positions really matter: a wrong rotary phase changes the outputs
    wrong = model(x.gather(1, perm), torch.arange(L).expand(B, L), AttentionMask("full"))
    assert (wrong - permuted)[..., :7].abs().max() > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cached_chunks_equal_one_causal_forward(gen, dtype, tol):
    """Feeding a permuted sequence in chunks through the KV cache (committing each chunk)
    gives the logits of one causal forward over the whole permuted sequence: exact in
    float64, equal up to summation order in float32."""
    model = sharp_model("eso_b", dtype=dtype)
    B, L = 2, 16
    x = torch.randint(0, 8, (B, L), generator=gen)  # 7 is the mask id
    perm = torch.stack([torch.randperm(L, generator=gen) for _ in range(B)])
    full = model(x.gather(1, perm), perm, AttentionMask("causal"))
    cache = model.new_cache(B)
    pieces, start = [], 0
    for size in (3, 1, 5, 7):
        sl = slice(start, start + size)
        pieces.append(model(x.gather(1, perm)[:, sl], perm[:, sl], AttentionMask("causal"), cache=cache,
                            commit=size))
        start += size
    assert cache.length == L
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=tol, rtol=tol)


def test_uncommitted_scratch_tokens_leave_no_trace(gen):
    """Tokens fed but not committed (scratch masks) do not affect later steps."""
    model = sharp_model("eso_b")
    B, L = 2, 8
    x = torch.randint(0, 7, (B, L), generator=gen)
    pos = torch.arange(L).expand(B, L)
    cache = model.new_cache(B)
    model(x[:, :3], pos[:, :3], AttentionMask("causal"), cache=cache, commit=2)
    assert cache.length == 2
    after = model(x[:, 2:5], pos[:, 2:5], AttentionMask("causal"), cache=cache, commit=3)
    ref = model(x[:, :5], pos[:, :5], AttentionMask("causal"))[:, 2:5]
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)


def test_appending_later_tokens_does_not_change_earlier_logits(gen):
    """Causal on the permutation: a prefix of the permuted sequence has the same logits alone."""
    model = sharp_model("eso_b")
    B, L = 2, 16
    x = torch.randint(0, 8, (B, L), generator=gen)
    perm = torch.stack([torch.randperm(L, generator=gen) for _ in range(B)])
    full = model(x.gather(1, perm), perm, AttentionMask("causal"))
    part = model(x.gather(1, perm)[:, :9], perm[:, :9], AttentionMask("causal"))
    torch.testing.assert_close(part, full[:, :9], atol=1e-5, rtol=1e-5)


def test_mask_logit_is_minus_infinity(gen):
    model = sharp_model("eso_b")
    x = torch.randint(0, 7, (2, 16), generator=gen)
    logits = model(x, torch.arange(16).expand(2, 16), AttentionMask("causal"))
    assert torch.isneginf(logits[..., model.config.mask_token_id]).all()
    assert torch.isfinite(logits[..., :7]).all()


def test_cache_overflow_is_a_clear_error(gen):
    model = sharp_model("eso_b")
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="capacity 4"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], AttentionMask("causal"), cache=cache)


def test_cached_time_conditioning_follows_weight_updates(gen):
    """Without autograd the t = 0 conditioning is reused, but never after a weight changes."""
    model = sharp_model("eso_b")
    x = torch.randint(0, 7, (2, 16), generator=gen)
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        before = model(x, pos, AttentionMask("causal"))
        assert torch.equal(model(x, pos, AttentionMask("causal")), before)
        model.time.mlp[0].weight.mul_(3.0)  # in-place update
        after = model(x, pos, AttentionMask("causal"))
        model.blocks[1].modulation.bias.add_(0.5)  # a per-block modulation layer too
        later = model(x, pos, AttentionMask("causal"))
    assert (after - before)[..., :7].abs().max() > 1e-4
    assert (later - after)[..., :7].abs().max() > 1e-4
    after = later
    fresh = model(x, pos, AttentionMask("causal"))  # with autograd: always recomputed
    torch.testing.assert_close(fresh, after)
    model.load_state_dict({k: v * 0.5 if k.startswith("time.") else v
                           for k, v in model.state_dict().items()})
    with torch.no_grad():
        reloaded = model(x, pos, AttentionMask("causal"))
    torch.testing.assert_close(reloaded, model(x, pos, AttentionMask("causal")))


def _fresh_logits(model, tokens, pos):
    """Logits of a new model holding the same weights (no state carried over)."""
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        return clone.eval()(tokens, pos, AttentionMask("causal"))


@pytest.mark.parametrize("write", ["data", "fused_adamw"])
def test_t0_modulations_never_go_stale(write):
    """Neither a write through ``.data`` nor a fused optimizer step bumps a tensor's version
    counter; modulations cached on (pointer, version) missed both. Outside ``inference()``
    nothing is cached, and each ``inference()`` call computes them afresh."""
    model = sharp_model("eso_b")
    tokens = torch.randint(0, 7, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        before = model(tokens, pos, AttentionMask("causal"))
    with model.inference():
        torch.testing.assert_close(model(tokens, pos, AttentionMask("causal")), before, rtol=0, atol=0)
    if write == "data":
        for m in (model.blocks[0].modulation, model.modulation_out):
            m.weight.data.mul_(3.0)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        model(tokens, pos, AttentionMask("causal")).logsumexp(-1).mean().backward()
        opt.step()
        model.eval()
    expected = _fresh_logits(model, tokens, pos)
    assert not torch.allclose(expected, before)  # the write changed the model
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, pos, AttentionMask("causal")), expected)
    with model.inference():
        torch.testing.assert_close(model(tokens, pos, AttentionMask("causal")), expected)
