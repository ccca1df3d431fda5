"""Exact likelihood: normalisation by enumeration, agreement with the loss and the sampler."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from esolm import generate, iw_log_prob, loss, order_log_prob
from esolm.config import ScheduleSettings
from esolm.likelihood import (
    bd3lm_random_order,
    draw_orders,
    exact_per_token,
    left_to_right,
    nelbo_per_token,
    random_order,
    sampler_order,
)
from tests.conftest import sharp_model

ALL = torch.tensor(list(itertools.product(range(3), repeat=4)))  # every sequence, V=3, L=4


def _orders(family: str):
    if family == "ar":
        return [left_to_right(81, 4)]
    if family == "bd3lm":
        return [torch.tensor([1, 0, 3, 2]).expand(81, 4), left_to_right(81, 4)]
    return [left_to_right(81, 4), torch.tensor([2, 0, 3, 1]).expand(81, 4),
            torch.tensor([3, 2, 1, 0]).expand(81, 4)]


@pytest.mark.parametrize("family", ["ar", "eso_a", "eso_b", "mdlm", "bd3lm"])
def test_probabilities_of_all_sequences_sum_to_one(family):
    model = sharp_model(family, vocab_size=3, length=4, block_size=2, dtype=torch.float64)
    for order in _orders(family):
        total = order_log_prob(model, ALL, order).exp().sum()
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=total.dtype), atol=1e-5, rtol=0)


def test_enumeration_detects_a_leak(monkeypatch):
    """The check can fail: if each query could also see its own clean token, the
    'probabilities' would no longer sum to one."""
    import importlib

    att = importlib.import_module("esolm.model.masks")  # where the masks are written
    model = sharp_model("eso_b", vocab_size=3, length=4, dtype=torch.float64)
    honest = att.mask_function

    def leaky(mask):
        fn = honest(mask)
        if mask.kind != "two_stream":
            return fn
        return lambda b, q, kv: fn(b, q, kv) | (kv == q + mask.half)

    monkeypatch.setattr(att, "mask_function", leaky)
    total = order_log_prob(model, ALL, left_to_right(81, 4)).exp().sum()
    assert abs(total.item() - 1.0) > 1e-2


@pytest.mark.parametrize("family", ["eso_a", "eso_b"])
def test_alpha0_zero_left_to_right_equals_minus_the_sequential_loss(family, gen):
    model = sharp_model(family, alpha_0=0.0)
    x = torch.randint(0, 7, (5, 16), generator=gen)
    lp = order_log_prob(model, x, left_to_right(5, 16))
    out = loss(model, x, generator=gen)
    torch.testing.assert_close(lp.sum(), -out.sequential_nll, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family,alpha_0", [("eso_b", 0.25), ("eso_b", 1.0), ("mdlm", None), ("ar", None)])
@pytest.mark.parametrize("law", ["sampler", "uniform"])
def test_iw_with_one_order_equals_the_order_log_prob(family, alpha_0, law, gen):
    model = sharp_model(family, alpha_0=alpha_0)
    x = torch.randint(0, 7, (3, 16), generator=gen)
    lb = iw_log_prob(model, x, num_orders=1, generator=torch.Generator().manual_seed(4), law=law)
    g4 = torch.Generator().manual_seed(4)
    if family == "ar":
        order = left_to_right(3, 16)
    elif law == "sampler":  # the paper's law: Binomial(L, alpha_0) random prefix, then left to right
        order = sampler_order(3, 16, model.config.alpha_0, g4)
    else:
        order = random_order(3, 16, g4)
    torch.testing.assert_close(lb, order_log_prob(model, x, order), rtol=1e-5, atol=1e-5)
    # more orders: a log-mean-exp, never below the smallest single-order value
    lb4 = iw_log_prob(model, x, num_orders=4, generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(lb4).all()


@pytest.mark.parametrize("family", ["eso_a", "eso_b", "ar", "mdlm"])
def test_padding_does_not_change_per_token_results(family, gen):
    model = sharp_model(family, vocab_size=8, pad_token_id=7)
    x = torch.randint(0, 7, (2, 10), generator=gen)
    padded = torch.cat((x, torch.full((2, 6), 7)), 1)
    order = left_to_right(2, 10)
    padded_order = left_to_right(2, 16)
    torch.testing.assert_close(order_log_prob(model, padded, padded_order),
                               order_log_prob(model, x, order), rtol=1e-5, atol=1e-5)


def test_sampler_matches_the_exact_likelihood_by_chi_square():
    """Property 5: for alpha_0 = 0, sampled frequencies match exp(order_log_prob(l2r))."""
    model = sharp_model("eso_b", vocab_size=3, length=3, alpha_0=0.0)
    xs = torch.tensor(list(itertools.product(range(3), repeat=3)))
    probs = order_log_prob(model, xs, left_to_right(27, 3)).exp().double()
    n = 20000
    g = generate(model, ScheduleSettings(steps=3, seed=0), num_samples=n)
    index = (g.tokens * torch.tensor([9, 3, 1])).sum(1)
    counts = torch.bincount(index, minlength=27).double()
    expected = probs / probs.sum() * n
    keep = expected >= 5
    obs, exp = counts[keep], expected[keep]
    if not keep.all():  # pool the rare sequences into one bin
        obs = torch.cat((obs, counts[~keep].sum().view(1)))
        exp = torch.cat((exp, expected[~keep].sum().view(1)))
    assert 3 / 27 < probs.max() < 0.9, "the model is too flat or too peaked for a meaningful test"
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_sampler_order_has_a_binomial_prefix_then_left_to_right():
    g = torch.Generator().manual_seed(0)
    o = sampler_order(200, 32, 0.25, g)
    assert torch.equal(torch.sort(o, 1).values, torch.arange(32).expand(200, 32))
    tails_sorted = []
    for row in o:
        # the longest sorted suffix holds every position not in the random prefix
        k = 31
        while k > 0 and row[k - 1] < row[k]:
            k -= 1
        tails_sorted.append(32 - k)
    assert 20 < sum(tails_sorted) / 200 < 28  # about (1 - alpha_0) * L = 24, plus lucky runs


def test_bd3lm_orders_must_respect_blocks():
    model = sharp_model("bd3lm", block_size=4)
    x = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="block"):
        order_log_prob(model, x, torch.arange(15, -1, -1)[None])
    lp = order_log_prob(model, x, bd3lm_random_order(1, 16, 4))
    assert torch.isfinite(lp).all()


def test_bad_orders_are_clear_errors():
    model = sharp_model("eso_b")
    x = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="permutation"):
        order_log_prob(model, x, torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        order_log_prob(model, x, left_to_right(2, 8))
    with pytest.raises(ValueError, match="left-to-right"):
        order_log_prob(sharp_model("ar"), x, random_order(2, 16))


def test_split_metrics_nelbo_and_exact(gen):
    from esolm.likelihood import exact_per_token, nelbo_per_token

    model = sharp_model("eso_b", alpha_0=0.0)
    batches = [torch.randint(0, 7, (4, 16), generator=gen) for _ in range(3)]
    nelbo = nelbo_per_token(model, batches, draws=3, generator=gen)
    exact = exact_per_token(model, batches, lambda b, n, g: left_to_right(b, n))
    assert nelbo["tokens"] == exact["tokens"] == 3 * 4 * 16
    # alpha_0 = 0: the NELBO is the exact left-to-right likelihood, with no Monte Carlo noise
    assert nelbo["nats_per_token"] == pytest.approx(exact["nats_per_token"], rel=1e-5)
    assert nelbo["stderr"] == pytest.approx(0.0, abs=1e-6)
    noisy = nelbo_per_token(sharp_model("eso_b", alpha_0=0.5), batches, draws=3, generator=gen)
    assert noisy["stderr"] > 0
    with pytest.raises(ValueError, match="empty"):
        nelbo_per_token(model, [], draws=2)


def test_iw_orders_follow_the_sampler_law():
    """sampler law at alpha_0 = 0.25: a random prefix of about L / 4 positions, the rest left
    to right; the uniform law is a different (uniformly random) order."""
    model = sharp_model("eso_b", alpha_0=0.25, length=64)
    orders = draw_orders(model, 400, 64, "sampler", torch.Generator().manual_seed(0))
    prefix = []
    for row in orders:
        # the longest increasing suffix is the sequential (left-to-right) part
        tail = next(n for n in range(64, 0, -1) if bool((row[64 - n:].diff() > 0).all()))
        prefix.append(64 - tail)
    assert abs(sum(prefix) / len(prefix) - 16) < 1.5
    uniform = draw_orders(model, 400, 64, "uniform", torch.Generator().manual_seed(0))
    increasing = (uniform[:, 32:].diff(dim=1) > 0).all(dim=1).float().mean()
    assert increasing < 0.01
    with pytest.raises(ValueError, match="law='best' is unknown"):
        draw_orders(model, 2, 64, "best")


@pytest.mark.parametrize("fn", ["order", "iw", "nelbo", "exact"])
def test_likelihoods_are_deterministic_for_a_model_in_training_mode(fn):
    """Dropout must not make evaluation random: evaluation runs in eval mode and gives the
    caller back the mode it had."""
    model = sharp_model("eso_b", alpha_0=0.5, dropout=0.3).train()
    x = torch.randint(0, 7, (4, 16), generator=torch.Generator().manual_seed(0))
    calls = {"order": lambda: order_log_prob(model, x, random_order(4, 16, torch.Generator().manual_seed(1))),
             "iw": lambda: iw_log_prob(model, x, 2, torch.Generator().manual_seed(1)),
             "nelbo": lambda: torch.tensor(nelbo_per_token(model, [x], 2, torch.Generator().manual_seed(1))[
                 "nats_per_token"]),
             "exact": lambda: torch.tensor(exact_per_token(
                 model, [x], lambda b, n, g: random_order(b, n, g), torch.Generator().manual_seed(1))[
                 "nats_per_token"])}
    first, second = calls[fn](), calls[fn]()
    assert model.training
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(first, calls[fn](), rtol=0, atol=0)


def test_the_nelbo_of_a_row_is_on_the_exact_metrics_own_tokens(gen):
    """Issue #22: the report's AR row showed NELBO 16.9 beside exact 18.5, the two computed on
    16,384 and 2,048 tokens. ``nelbo_paired_*`` is the NELBO of the same draws on the exact
    metrics' own batches: for AR (and alpha_0 = 0) it is the exact likelihood itself."""
    from esolm.config import EvalConfig
    from esolm.likelihood import evaluate_split, nelbo_per_token

    batches = [torch.randint(0, 7, (4, 16), generator=gen) for _ in range(4)]
    ev = EvalConfig(nelbo_batches=4, nelbo_draws=2, exact_batches=1, iw_orders=(1,))
    for family in ("ar", "eso_b"):
        out = evaluate_split(sharp_model(family, alpha_0=0.0 if family == "eso_b" else None), batches, ev, 1.0)
        assert out["nelbo_paired_ppl"] == pytest.approx(out["exact_l2r_ppl"], rel=1e-5)
        assert out["nelbo_tokens"] == 4 * 64 and out["tokens"] == 64  # the plain NELBO: every batch
    model = sharp_model("eso_b", alpha_0=0.5)
    both = nelbo_per_token(model, batches, draws=2, generator=torch.Generator().manual_seed(3), paired=4)
    assert both["paired"]["nats_per_token"] == pytest.approx(both["nats_per_token"], rel=1e-12)
    alone = nelbo_per_token(model, batches[:1], draws=1, generator=torch.Generator().manual_seed(3))
    first = nelbo_per_token(model, batches, draws=1, generator=torch.Generator().manual_seed(3), paired=1)
    assert first["paired"]["nats_per_token"] == pytest.approx(alone["nats_per_token"], rel=1e-12)
    assert first["paired"]["tokens"] == alone["tokens"] == 64
