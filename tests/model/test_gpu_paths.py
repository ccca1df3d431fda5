"""Every GPU code path, run on CPU: flex attention for every mask (values and gradients)
against plain math, the backbone under each backend through one closure, the flash
fallback, and bf16 autocast in a training step and in sampling."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from esolm import generate, loss
from esolm.config import ScheduleSettings
from esolm.model.attention import AttentionMask, attention, tail_mask
from esolm.sampling.decode import sample_tokens
from tests.conftest import randomize, sharp_model
from tests.model.test_attention import reference_mask, specs

att = importlib.import_module("esolm.model.attention")  # the module (the package exports a function)
CPU_BACKENDS = ("math", "sdpa", "flex")


def run_under_backends(closure: Callable[[str], Any], backends=CPU_BACKENDS) -> dict[str, Any]:
    """Run one closure once per backend (the closure takes the backend name)."""
    return {b: closure(b) for b in backends}


def with_backend(model, backend: str):
    """The same model (same weights) with every layer on ``backend``."""
    model.config = model.config.replace(attn_backend=backend)
    for block in model.blocks:
        block.backend = backend
    return model


def _all_specs(L: int, B: int, gen: torch.Generator):
    """Every mask of the project, with key padding, and cached-decode offsets."""
    yield from specs(L, B, gen)
    keep = torch.rand(B, L, generator=gen) > 0.3
    yield AttentionMask("full", keep=keep)  # MDLM with padding
    yield AttentionMask("causal", keep=keep)
    n_clean = torch.randint(0, L + 1, (B,), generator=gen)
    for off in (1, L // 2):
        yield AttentionMask("causal", q_offset=off)
        yield AttentionMask("block_causal", block=2, q_offset=off)
        yield AttentionMask("prefix", n_clean=n_clean, q_offset=off)


def _shapes(mask: AttentionMask, L: int) -> tuple[int, int]:
    n = 2 * L if mask.kind == "two_stream" else L
    n_q = n - mask.q_offset
    return n_q, n


def _attention_closure(mask: AttentionMask, L: int, gen: torch.Generator, grads: bool):
    B, H, D = 2, 2, 8
    n_q, n_kv = _shapes(mask, L)
    q = torch.randn(B, H, n_q, D, generator=gen).requires_grad_(grads)
    k, v = (torch.randn(B, H, n_kv, D, generator=gen).requires_grad_(grads) for _ in range(2))
    w = torch.randn(B, H, n_q, D, generator=gen)

    def closure(backend: str) -> tuple[torch.Tensor, ...]:
        out = attention(q, k, v, mask, backend)
        return (out, *torch.autograd.grad((out * w).sum(), (q, k, v))) if grads else (out,)

    return closure


def test_flex_runs_every_mask_on_cpu_like_math(gen):
    """Values of flex attention (its mask_mod and block mask) equal math for every mask."""
    for mask in _all_specs(8, 2, gen):
        runs = run_under_backends(_attention_closure(mask, 8, gen, grads=False), ("math", "flex"))
        torch.testing.assert_close(runs["flex"][0], runs["math"][0], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, mask=mask: f"{mask}: {m}")


def test_flex_gradients_on_cpu_fall_back_to_sdpa_with_the_same_mask(gen):
    """torch's flex attention has no backward on CPU: with gradients the flex backend warns
    once and runs sdpa on the dense form of the same mask function; values and gradients
    equal math for every mask."""
    att._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="no backward on CPU"):
        attention(*(torch.randn(1, 1, 4, 8).requires_grad_() for _ in range(3)), AttentionMask("causal"), "flex")
    for mask in _all_specs(8, 2, gen):
        runs = run_under_backends(_attention_closure(mask, 8, gen, grads=True), ("math", "flex"))
        for got, ref in zip(runs["flex"], runs["math"]):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m, mask=mask: f"{mask}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs CUDA")
def test_flex_gradients_on_cuda_like_math(gen):
    device = torch.device("cuda")
    B, H, D, L = 2, 2, 16, 128
    for mask in _all_specs(L, B, gen):
        mask = AttentionMask(mask.kind, mask.block, None if mask.n_clean is None else mask.n_clean.to(device),
                        mask.half, mask.inner, mask.q_offset,
                        None if mask.keep is None else mask.keep.to(device))
        n_q, n_kv = _shapes(mask, L)
        q = torch.randn(B, H, n_q, D, device=device, requires_grad=True)
        k, v = (torch.randn(B, H, n_kv, D, device=device, requires_grad=True) for _ in range(2))
        outs = {b: attention(q, k, v, mask, b) for b in ("flex", "math")}
        grads = {b: torch.autograd.grad(o.sum(), (q, k, v)) for b, o in outs.items()}
        torch.testing.assert_close(outs["flex"], outs["math"], atol=1e-4, rtol=1e-4)
        for a, b in zip(grads["flex"], grads["math"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["eso_b", "eso_a", "mdlm", "bd3lm", "ar"])
def test_backbone_loss_and_gradients_agree_across_backends(family, gen):
    """One closure (loss and gradients of a training step) under math, sdpa and flex (whose
    CPU backward is the sdpa fallback), then the no-grad loss, where flex itself runs."""
    x = torch.randint(0, 7, (4, 16), generator=gen)

    def closure(backend: str) -> list[torch.Tensor]:
        model = with_backend(sharp_model(family, alpha_0=0.5 if family.startswith("eso") else None),
                             backend).train()
        out = loss(model, x, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(out.per_token, list(model.parameters()), allow_unused=True)
        return [out.per_token.detach()] + [g for g in grads if g is not None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        runs = run_under_backends(closure)
    for backend in ("sdpa", "flex"):
        for got, ref in zip(runs[backend], runs["math"]):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)

    def no_grad(backend: str) -> torch.Tensor:
        model = with_backend(sharp_model(family, alpha_0=0.5 if family.startswith("eso") else None),
                             backend)
        with torch.no_grad():
            return loss(model, x, generator=torch.Generator().manual_seed(0)).per_token

    values = run_under_backends(no_grad, ("math", "flex"))
    torch.testing.assert_close(values["flex"], values["math"], atol=2e-5, rtol=2e-5)


def test_cached_sampling_under_flex_equals_math():
    """The KV-cached decode path (offset queries, cache slices) through flex."""
    def closure(backend: str):
        model = with_backend(sharp_model("eso_b", alpha_0=0.5), backend)
        return generate(model, ScheduleSettings(steps=4, seed=7), num_samples=2, record_logits=True)

    runs = run_under_backends(closure, ("math", "flex"))
    assert torch.equal(runs["flex"].tokens, runs["math"].tokens)
    for a, b in zip(runs["flex"].step_logits, runs["math"].step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_on_cpu_falls_back_to_sdpa_with_one_warning():
    att._WARNED.clear()
    q = torch.randn(1, 2, 6, 8)
    with pytest.warns(RuntimeWarning, match="flash.*using sdpa"):
        out = attention(q, q, q, AttentionMask("causal"), "flash")
    torch.testing.assert_close(out, attention(q, q, q, AttentionMask("causal"), "sdpa"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per process
        attention(q, q, q, AttentionMask("causal"), "flash")


@pytest.mark.parametrize("block", [1, 2, 4, 3])
def test_decode_tail_masks_are_views_equal_to_the_reference(block):
    """The band views used by cached decode steps, across growth of the band."""
    B = 1
    for n_q, start in [(1, 0), (2, 6), (4, 12), (8, 1500), (20, 2400), (3, 9)]:
        start = start // block * block
        n_kv = start + n_q
        kind = "causal" if block == 1 else "block_causal"
        mask = AttentionMask(kind, block=block, q_offset=start)
        got = tail_mask(block, n_q, n_kv, torch.device("cpu"))
        assert got.shape == (n_q, n_kv)
        if n_kv <= 40:
            assert torch.equal(got[None, None].expand(B, 1, -1, -1), reference_mask(mask, B, n_q, n_kv))
        assert torch.equal(got, att.dense_mask(mask, B, n_q, n_kv, torch.device("cpu"))[0, 0])


# ----------------------------------------------------------------------------- bf16 autocast

def test_bf16_autocast_training_step_is_finite_and_close_to_fp32(gen):
    """Loss within 2% and gradients with cosine similarity > 0.99 of float32 (bf16 keeps 8
    mantissa bits: about 0.4% per rounding); the optimizer step stays finite."""
    model = sharp_model("eso_b", alpha_0=0.5).train()
    x = torch.randint(0, 7, (8, 16), generator=gen)

    def step(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loss(model, x, generator=torch.Generator().manual_seed(3))
        out.per_token.backward()
        return out.per_token.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref_loss, ref_grad = step(False)
    bf_loss, bf_grad = step(True)
    assert torch.isfinite(bf_loss) and torch.isfinite(bf_grad).all()
    assert abs(bf_loss - ref_loss) / ref_loss < 2e-2
    assert torch.nn.functional.cosine_similarity(bf_grad, ref_grad, dim=0) > 0.99
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_sampling_keeps_float32_logits_and_is_close_to_fp32():
    """Under autocast the logits stay float32 and the first step's logits (same input for
    both) are within 0.05 + 5% of float32; tokens are valid and finite everywhere."""
    model = sharp_model("eso_b", alpha_0=0.5)
    ref = generate(model, ScheduleSettings(steps=4, seed=5), num_samples=4, record_logits=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate(model, ScheduleSettings(steps=4, seed=5), num_samples=4, record_logits=True)
    assert all(s.dtype == torch.float32 for s in got.step_logits)
    assert ((got.tokens >= 0) & (got.tokens < 7)).all()
    real = slice(0, 7)
    assert all(torch.isfinite(s[..., real]).all() for s in got.step_logits)
    torch.testing.assert_close(got.step_logits[0][..., real], ref.step_logits[0][..., real],
                               atol=5e-2, rtol=5e-2)


def test_bf16_weights_sample_with_float64_gumbel_noise_on_float32_logits():
    """A bf16 model samples; the decode draws are argmax(float64(float32 logits) + G) with G
    float64 Gumbel noise, reproduced here from the same generator."""
    model = sharp_model("eso_b", alpha_0=0.5).to(torch.bfloat16)
    g = generate(model, ScheduleSettings(steps=4, seed=2), num_samples=3, record_logits=True)
    assert ((g.tokens >= 0) & (g.tokens < 7)).all()
    assert all(s.dtype == torch.float32 for s in g.step_logits)
    logits = torch.randn(5, 3, 9).to(torch.bfloat16)
    got = sample_tokens(logits, torch.Generator().manual_seed(1))
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u))
    assert torch.equal(got, torch.argmax(logits.float().double() + gumbel, dim=-1))


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.slow
def test_train_compile_true_matches_eager_loss_and_gradients(gen):
    """``train.compile=true`` on CPU: the compiled network the Lightning module trains gives
    the eager loss and gradients (inductor may reorder float32 sums: 1e-4)."""
    from esolm.config import ModelConfig
    from esolm.lit import LitModel
    from esolm.train_config import TrainConfig

    cfg = ModelConfig(family="eso_b", vocab_size=7, length=16, n_layers=2, d_model=32, n_heads=4,
                      cond_dim=32, dropout=0.0, alpha_0=0.5)
    module = LitModel(cfg, TrainConfig(steps=1, batch_size=4, compile=True))
    randomize(module.model, 0.18)  # every weight non-zero: equalities must not hold trivially
    assert module.net is not module.model
    x = torch.randint(0, 7, (4, 16), generator=gen)

    def run(net) -> list[torch.Tensor]:
        out = loss(net, x, generator=torch.Generator().manual_seed(0))
        return [out.per_token.detach(), *torch.autograd.grad(out.per_token, list(module.model.parameters()))]

    for got, ref in zip(run(module.net), run(module.model)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- first GPU run (reports/gpu)

def _decode_specs():
    """Masks the flash backend serves: full, aligned causal, and cached causal tails."""
    return [(AttentionMask("full"), 12, 12), (AttentionMask("causal"), 12, 12),
            (AttentionMask("causal", q_offset=11), 1, 12), (AttentionMask("causal", q_offset=9), 3, 12),
            (AttentionMask("block_causal", block=2, q_offset=8), 4, 12)]


@pytest.mark.parametrize("sdpa_flash", [True, False])
def test_flash_backend_without_flash_attn_runs_like_math(monkeypatch, sdpa_flash, gen):
    """On a GPU without the flash-attn package, ``flash`` in bf16 ran ``import flash_attn`` and
    failed (reports/gpu/b_attn.json). Simulated here: the device counts as an accelerator and
    flash-attn is missing; SDPA's flash kernel is there or not. Every mask matches math."""
    monkeypatch.setattr(att, "is_accelerator", lambda device: True)
    monkeypatch.setattr(att, "_flash_attn_func", lambda: None)
    monkeypatch.setattr(att, "sdpa_flash_available", lambda: sdpa_flash)
    for mask, n_q, n_kv in _decode_specs():
        q = torch.randn(2, 2, n_q, 16, generator=gen).bfloat16()
        k, v = (torch.randn(2, 2, n_kv, 16, generator=gen).bfloat16() for _ in range(2))
        out = attention(q, k, v, mask, "flash")
        ref = attention(q.double(), k.double(), v.double(), mask, "math")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_flash_backend_takes_flash_attn_with_a_bottom_right_causal_tail(monkeypatch, gen):
    """With flash-attn installed, plain masks and causal decode tails go to it (causal only
    for more than one query); other masks fall back to sdpa."""
    calls = []

    def fake(q, k, v, causal):  # flash-attn layout [B, N, H, D]; bottom-right aligned causal
        calls.append((q.shape[1], k.shape[1], causal))
        mask = AttentionMask("causal", q_offset=k.shape[1] - q.shape[1]) if causal else AttentionMask("full")
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, "math").transpose(1, 2)

    monkeypatch.setattr(att, "is_accelerator", lambda device: True)
    monkeypatch.setattr(att, "_flash_attn_func", lambda: fake)
    for mask, n_q, n_kv in _decode_specs():
        q = torch.randn(1, 2, n_q, 8, generator=gen).bfloat16()
        k, v = (torch.randn(1, 2, n_kv, 8, generator=gen).bfloat16() for _ in range(2))
        torch.testing.assert_close(attention(q, k, v, mask, "flash").double(),
                                   attention(q.double(), k.double(), v.double(), mask, "math"),
                                   atol=2e-2, rtol=2e-2)
    assert calls == [(12, 12, False), (12, 12, True), (1, 12, False), (3, 12, True)]  # not block_causal


def test_bf16_autocast_gives_attention_one_dtype_and_a_bf16_cache(monkeypatch, gen):
    """Under bf16 autocast the rotary tables were float32, so q and k reached attention in
    float32 and v in bf16 (reports/gpu/a_bf16.json: every family); flex refuses that mix in
    backward. Now all three share the compute dtype, and a cache made there is bf16."""
    import esolm.model.backbone as bb

    seen = []
    orig = bb.attention

    def spy(q, k, v, mask, backend="sdpa"):
        seen.append((q.dtype, k.dtype, v.dtype))
        return orig(q, k, v, mask, backend)

    monkeypatch.setattr(bb, "attention", spy)
    for family in ("eso_b", "ar", "bd3lm"):
        model = sharp_model(family, **({"alpha_0": 0.5} if family == "eso_b" else {})).train()
        x = torch.randint(0, 7, (4, 16), generator=gen)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(model, x, generator=torch.Generator().manual_seed(0))
            cache = model.new_cache(2)
        out.per_token.backward()
        assert seen and set(seen) == {(torch.bfloat16,) * 3}, (family, set(seen))
        assert cache.k.dtype == cache.v.dtype == torch.bfloat16
        assert model.new_cache(2).k.dtype == torch.float32  # outside autocast: the weights' dtype


def test_single_query_decode_step_builds_no_mask_and_matches_math(gen):
    """One query at the tail of the keys sees every key: no dense mask is built for it."""
    mask = AttentionMask("causal", q_offset=20)
    assert att.prebuild(mask, 2, 1, 21, torch.device("cpu"), "sdpa").dense is None
    assert att.prebuild(mask, 2, 1, 21, torch.device("cpu"), "math").dense is not None
    assert att.prebuild(AttentionMask("causal", q_offset=18), 2, 3, 21, torch.device("cpu"), "sdpa").dense is not None
    q = torch.randn(2, 2, 1, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 21, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(attention(q, k, v, mask, "sdpa"), attention(q, k, v, mask, "math"))


def test_sampling_never_runs_cudnn_attention(monkeypatch):
    """cuDNN's SDPA builds a plan per new sequence length (about 70 ms each on an H200,
    reports/gpu/probe/probe.jsonl): sampling, whose lengths change every step, runs without it."""
    import esolm.model.backbone as bb

    states = []
    orig = bb.attention

    def spy(q, k, v, mask, backend="sdpa"):
        states.append(torch.backends.cuda.cudnn_sdp_enabled())
        return orig(q, k, v, mask, backend)

    monkeypatch.setattr(bb, "attention", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for family in ("eso_b", "ar"):
        model = sharp_model(family, **({"alpha_0": 0.5} if family == "eso_b" else {}))
        generate(model, ScheduleSettings(steps=4, seed=0), num_samples=1)
    assert states and not any(states)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards


def test_flex_builds_one_block_mask_per_forward_not_per_layer(monkeypatch, gen):
    """Per-row masks (Eso-LM (A)'s clean prefix) and cached decode steps rebuilt a BlockMask in
    every layer; now once per forward, shared by the layers, and the result is unchanged."""
    import torch.nn.attention.flex_attention as fa

    built = []
    real = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    model = sharp_model("eso_a", alpha_0=0.5)
    n_layers = len(model.blocks)
    assert n_layers > 1
    B, L = 2, model.config.length
    x = torch.randint(0, 7, (B, L), generator=gen)
    pos = torch.arange(L).expand(B, L)
    mask = AttentionMask("prefix", n_clean=torch.tensor([3, 9]))
    outs = {}
    with torch.no_grad():
        for backend in ("flex", "math"):
            built.clear()
            outs[backend] = with_backend(model, backend)(x, pos, mask)
            if backend == "flex":
                assert len(built) == 1
            cache = model.new_cache(B)  # a cached step after 10 tokens
            model(x[:, :10], pos[:, :10], AttentionMask("causal"), cache=cache, commit=10)
            built.clear()
            outs[backend + "_step"] = model(x[:, 10:12], pos[:, 10:12], AttentionMask("causal"), cache=cache, commit=1)
            if backend == "flex":
                assert len(built) == 1
    torch.testing.assert_close(outs["flex"], outs["math"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["flex_step"], outs["math_step"], atol=1e-4, rtol=1e-4)


def test_flex_on_a_gpu_is_compiled_once_and_reused(monkeypatch, gen):
    """flex ran eagerly on CUDA (unfused, the whole score matrix built). On an accelerator it is
    now ``torch.compile``d once per process (simulated here: the compile is a recording stub)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = []
    real_compile = torch.compile

    def fake_compile(fn, **kw):
        if fn is not flex_attention:  # torch compiles its own helpers too
            return real_compile(fn, **kw)
        compiled.append(kw)
        return fn

    monkeypatch.setattr(att, "is_accelerator", lambda device: True)
    monkeypatch.setattr(att, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    q = torch.randn(1, 2, 8, 16, generator=gen)
    with torch.no_grad():
        for _ in range(3):
            out = attention(q, q, q, AttentionMask("causal"), "flex")
    assert compiled == [{"dynamic": False}]
    torch.testing.assert_close(out, attention(q, q, q, AttentionMask("causal"), "math"), atol=1e-5, rtol=1e-5)
