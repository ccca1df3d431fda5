"""Objectives: limits of alpha_0, an independent AR reference, gradients, learning, invariances."""

from __future__ import annotations

import pytest
import torch

from esolm import ModelConfig, build_model, loss
from esolm.model.attention import AttentionMask
from tests.conftest import FAMILY_NAMES, randomize, sharp_model


def test_alpha0_one_has_no_sequential_term(gen):
    model = sharp_model("eso_b", alpha_0=1.0)
    x = torch.randint(0, 7, (6, 16), generator=gen)
    out = loss(model, x, generator=gen)
    assert out.sequential_tokens == 0 and out.sequential_nll == 0
    assert out.diffusion_tokens == x.numel() and out.diffusion_nll > 0


def _ar_reference_nll(model, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: for each j, a causal forward over [x_0..x_{j-1}, MASK] at
    positions 0..j; the last logit scores x_j. Summed over positions, [B]."""
    B, L = x.shape
    m = model.config.mask_token_id
    total = torch.zeros(B, dtype=torch.float64)
    for j in range(L):
        tokens = torch.cat((x[:, :j], torch.full((B, 1), m)), 1)
        logits = model(tokens, torch.arange(j + 1).expand(B, j + 1), AttentionMask("causal"))[:, -1]
        total -= torch.log_softmax(logits.double(), -1).gather(1, x[:, j:j + 1]).squeeze(1)
    return total


@pytest.mark.parametrize("family", ["eso_a", "eso_b"])
def test_alpha0_zero_is_left_to_right_ar_on_all_masks(family, gen):
    """alpha_0 = 0: no diffusion term, and the sequential loss equals the left-to-right AR
    loss of the same weights on an all-mask z_0 (computed position by position)."""
    model = sharp_model(family, alpha_0=0.0)
    x = torch.randint(0, 7, (4, 16), generator=gen)
    out = loss(model, x, generator=gen)
    assert out.diffusion_tokens == 0 and out.diffusion_nll == 0
    ref = _ar_reference_nll(model, x)
    torch.testing.assert_close(out.sequential_nll.double(), ref.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.per_token.double(), ref.sum() / x.numel(), rtol=1e-5, atol=1e-6)


def test_ar_variant_matches_the_independent_reference_up_to_its_input(gen):
    """The AR baseline feeds [BOS=mask, x_0..x_{L-2}]; its loss is finite and its first
    position is scored from the BOS alone."""
    model = sharp_model("ar")
    x = torch.randint(0, 7, (3, 16), generator=gen)
    out = loss(model, x)
    bos = torch.full((3, 1), model.config.mask_token_id)
    first = model(bos, torch.zeros(3, 1, dtype=torch.long), AttentionMask("causal"))[:, 0]
    nll0 = -torch.log_softmax(first, -1).gather(1, x[:, :1]).sum()
    full = model(torch.cat((bos, x[:, :-1]), 1), torch.arange(16).expand(3, 16), AttentionMask("causal"))
    nll = -torch.log_softmax(full, -1).gather(2, x[..., None]).sum()
    torch.testing.assert_close(out.sequential_nll, nll)
    assert nll0 < nll


def _rank_split(model, x, world):
    """Loss of the global batch computed as ``world`` processes would, then all-reduced."""
    from esolm.objectives import combine

    B = x.shape[0] // world
    outs = [loss(model, x[r * B:(r + 1) * B], torch.Generator().manual_seed(7), rank=r, world_size=world)
            for r in range(world)]
    return combine(*(sum(getattr(o, f) for o in outs) for f in
                     ("diffusion_nll", "diffusion_tokens", "sequential_nll", "sequential_tokens")))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_per_token_loss_does_not_depend_on_the_number_of_processes(family, gen):
    model = sharp_model(family, alpha_0=None if family in ("ar", "mdlm", "bd3lm") else 0.5)
    x = torch.randint(0, 7, (8, 16), generator=gen)
    single = loss(model, x, torch.Generator().manual_seed(7)).per_token
    for world in (2, 4):
        torch.testing.assert_close(_rank_split(model, x, world), single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_padding_never_counts(family, gen):
    model = sharp_model(family, pad_token_id=7, mask_token_id=8, vocab_size=8)
    x = torch.randint(0, 7, (4, 16), generator=gen)
    x[:, 12:] = 7
    out = loss(model, x, generator=gen)
    assert out.num_tokens == 4 * 12
    assert out.diffusion_tokens + out.sequential_tokens == 4 * 12


def test_ar_padding_does_not_change_the_loss_of_real_tokens(gen):
    model = sharp_model("ar", pad_token_id=7, mask_token_id=8, vocab_size=8)
    x = torch.randint(0, 7, (4, 16), generator=gen)
    padded = x.clone()
    padded[:, 10:] = 7
    torch.testing.assert_close(loss(model, padded).per_token, loss(model, x[:, :10]).per_token)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_variant_is_finite_reaches_every_parameter_and_learns(family):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=12, length=16, n_layers=2, d_model=32, n_heads=4,
                      cond_dim=32, dropout=0.0, alpha_0=0.5 if family.startswith("eso") else None)
    model = build_model(cfg)
    # tiny repetitive batch: two kinds of constant rows. (A position-dependent pattern is a poor
    # probe: with rotary positions only, a fully masked bidirectional input cannot tell
    # positions apart, so MDLM's NELBO floor there is high.)
    x = (torch.arange(8)[:, None] % 2 * 3 + 2).expand(8, 16).long()

    def fixed_loss():
        return loss(model, x, generator=torch.Generator().manual_seed(99)).per_token

    before = fixed_loss()
    assert torch.isfinite(before)
    with torch.no_grad():  # the training init (adaLN-Zero) predicts uniformly
        logits = model(x, torch.arange(16).expand(8, 16), AttentionMask("causal"))
    assert torch.equal(logits[..., :12], torch.zeros(8, 16, 12))
    probe = randomize(build_model(cfg), 0.02)  # with every weight non-zero, every one gets a gradient
    loss(probe, x, generator=torch.Generator().manual_seed(99)).per_token.backward()
    for name, p in probe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        opt.zero_grad()
        loss(model, x, generator=g).per_token.backward()
        opt.step()
    after = fixed_loss().item()
    print(f"{family}: loss {before.item():.3f} -> {after:.3f} after 30 AdamW steps")
    assert after < 0.5 * before.item()


@pytest.mark.parametrize("kw,field", [
    (dict(family="gpt"), "family"), (dict(attn_backend="fastest"), "attn_backend"),
    (dict(d_model=30, n_heads=4), "d_model"), (dict(alpha_0=1.5), "alpha_0"),
    (dict(alpha_0=-0.1), "alpha_0"), (dict(alpha_0=0.5, batch_split=1.0), "batch_split"),
    (dict(alpha_0=0.5, batch_split=0.0), "batch_split"),
    (dict(family="bd3lm", block_size=5, length=32), "block_size"),
    (dict(family="ar", alpha_0=0.5), "alpha_0"), (dict(n_layers=0), "n_layers"),
])
def test_bad_config_is_a_clear_error(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_bad_inputs_are_clear_errors(gen):
    model = sharp_model("eso_b")
    with pytest.raises(ValueError, match="exceeds the model's length"):
        loss(model, torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        loss(model, torch.full((2, 16), 7))
    with pytest.raises(ValueError, match="token ids"):
        loss(model, torch.full((2, 16), -1))
    with pytest.raises(ValueError, match="integer tensor"):
        loss(model, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="block_size"):
        loss(sharp_model("bd3lm", block_size=4), torch.zeros(2, 6, dtype=torch.long))


def test_model_sizes_build():
    cfg = ModelConfig.sized("tiny", vocab_size=10, length=8)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (256, 8, 8)
    assert ModelConfig.sized("small").d_model == 768
    assert ModelConfig.sized("medium").n_layers == 24
    with pytest.raises(ValueError, match="model size 'huge' is unknown"):
        ModelConfig.sized("huge")


def test_gpu_backends_on_cpu_run_or_fall_back_with_a_warning():
    """flex runs on CPU (its training backward through the sdpa fallback); flash, CUDA-only,
    warns once and uses sdpa: the loss equals the sdpa one either way."""
    import importlib
    import warnings

    importlib.import_module("esolm.model.attention")._WARNED.clear()
    x = torch.randint(0, 7, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = loss(sharp_model("eso_b"), x, generator=torch.Generator().manual_seed(1)).per_token
    for backend in ("flex", "flash"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = loss(sharp_model("eso_b", attn_backend=backend), x,
                       generator=torch.Generator().manual_seed(1)).per_token
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        if torch.cuda.is_available():
            continue
        assert any(("sdpa" in str(w.message)) for w in caught), backend


def test_no_cuda_literal_outside_device_selection():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "esolm"
    pattern = re.compile(r"""['"]cuda(:\d+)?['"]""")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "device.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"'cuda' literals outside esolm/device.py: {offenders}"


def test_time_draws_are_stratified_in_eps_to_one():
    """t in [eps, 1] (never near 0, where the alpha_0 = 1 NELBO weight explodes), one draw in
    each of n equal strata, each row its own offset (as the reference)."""
    from esolm.noise import antithetic_times

    t = antithetic_times(64, torch.Generator().manual_seed(0), eps=1e-3)
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    strata = ((t - 1e-3) / (1 - 1e-3) * 64).floor().long()
    assert torch.equal(strata, torch.arange(64))
    offsets = (t - 1e-3) / (1 - 1e-3) * 64 - torch.arange(64)
    assert offsets.std() > 0.1  # not one shared offset
    # the weight of the estimator's heaviest row stays bounded: at most 1 / eps
    from esolm.noise import diffusion_weight

    w = diffusion_weight(antithetic_times(4096, torch.Generator().manual_seed(1)), 1.0)
    assert float(w.max()) <= 1.0 / 1e-3 + 1e-6


def test_a_masking_warm_up_draws_times_below_its_ceiling_only():
    """t_max < 1 (train.mask_warmup_steps) stratifies t over [eps, t_max], so fewer tokens are
    masked; t_max = 1 is the reference's draw bit for bit; a ceiling at or below eps is an error."""
    from esolm.noise import alpha, antithetic_times
    from esolm.objectives import draw

    def g():
        return torch.Generator().manual_seed(0)

    assert torch.equal(antithetic_times(64, g(), 1e-3, 1.0), antithetic_times(64, g(), 1e-3))
    t = antithetic_times(64, g(), 1e-3, 0.3)
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 0.3
    assert torch.equal(((t - 1e-3) / (0.3 - 1e-3) * 64).floor().long(), torch.arange(64))
    with pytest.raises(ValueError, match=r"t_max=0.0005 is invalid.*\(eps=0.001, 1\]"):
        antithetic_times(4, g(), 1e-3, 5e-4)
    model = sharp_model("mdlm")
    x = torch.randint(0, 7, (32, 16), generator=g())
    assert torch.equal(loss(model, x, generator=g()).per_token, loss(model, x, generator=g(), t_max=1.0).per_token)
    for t_max, lo, hi in [(0.3, 0.1, 0.2), (1.0, 0.4, 0.6)]:  # E[masked fraction] = E[t] = t_max / 2
        d = draw(model.config, 32, 16, x.device, g(), t_max=t_max)
        assert float(d.t.max()) <= t_max
        masked = (d.u_mask >= alpha(d.t, 1.0, model.config.eps)[:, None]).float().mean()
        assert lo < float(masked) < hi, (t_max, float(masked))


def test_low_var_objective_drops_the_time_weight():
    model = sharp_model("mdlm")
    x = torch.randint(0, 7, (1, 16), generator=torch.Generator().manual_seed(0))
    from esolm.noise import diffusion_weight
    from esolm.objectives import draw

    for seed in range(3):  # one row: the same draws, the NELBO is low_var times the row's weight
        nelbo = loss(model, x, generator=torch.Generator().manual_seed(seed))
        low = loss(model, x, generator=torch.Generator().manual_seed(seed), objective="low_var")
        w = diffusion_weight(draw(model.config, 1, 16, x.device, torch.Generator().manual_seed(seed)).t, 1.0)
        torch.testing.assert_close(low.diffusion_nll * w[0], nelbo.diffusion_nll)
        assert low.diffusion_tokens == nelbo.diffusion_tokens == 16
    with pytest.raises(ValueError, match="low_var' applies to alpha_0 = 1"):
        loss(sharp_model("eso_b", alpha_0=0.5), x, objective="low_var")
    with pytest.raises(ValueError, match="objective='elbo' is unknown"):
        loss(model, x, objective="elbo")


def test_the_low_var_objective_of_a_study_reaches_the_alpha_0_1_models_only():
    from esolm.objectives import training_objective

    for family, kw, expected in [("mdlm", {}, "low_var"), ("bd3lm", {}, "low_var"),
                                 ("eso_b", dict(alpha_0=1.0), "low_var"), ("eso_b", dict(alpha_0=0.5), "nelbo"),
                                 ("eso_a", dict(alpha_0=0.25), "nelbo"), ("ar", {}, "nelbo")]:
        cfg = sharp_model(family, **kw).config
        assert training_objective(cfg, "low_var") == expected, family
        assert training_objective(cfg, "nelbo") == "nelbo"
    with pytest.raises(ValueError, match="unknown"):
        training_objective(cfg, "elbo")
