"""Samplers: cached equals uncached, schedule invariants, prompts, determinism, nucleus, errors."""

from __future__ import annotations

import pytest
import torch

from esolm import generate
from esolm.config import ScheduleSettings
from esolm.model.attention import AttentionMask
from esolm.ordering import make_schedule
from esolm.sampling import nucleus_filter, sample_tokens
from tests.conftest import FAMILY_NAMES, sharp_model

CAUSAL_SPEC = AttentionMask("causal")

ORDERS = [dict(order="random"), dict(order="block", subcontexts=4),
          dict(order="block", subcontexts=4, shuffle=True),
          dict(order="block", subcontexts=4, shuffle="per_chunk")]


@pytest.mark.parametrize("family", ["eso_a", "eso_b"])
@pytest.mark.parametrize("alpha_0", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("opts", ORDERS)
def test_cached_equals_uncached(family, alpha_0, opts):
    """Same seed: identical tokens, and the logits of every step agree within 1e-5."""
    model = sharp_model(family, alpha_0=alpha_0, length=16)
    runs = [generate(model, ScheduleSettings(steps=6, kv_cache=kv, seed=11, **opts), num_samples=4, record_logits=True)
            for kv in (True, False)]
    cached, full = runs
    assert cached.kv_cache and not full.kv_cache
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.nfe == full.nfe == len(cached.step_logits)
    for a, b in zip(cached.step_logits, full.step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["eso_a", "eso_b", "bd3lm", "ar"])
def test_cached_equals_uncached_in_float64_exactly(family):
    model = sharp_model(family, dtype=torch.float64, alpha_0=0.5 if family.startswith("eso") else None)
    prompt = {0: 1, 9: 2} if family != "ar" else {0: 1, 1: 2}
    runs = [generate(model, ScheduleSettings(steps=5, kv_cache=kv, seed=2), num_samples=3, record_logits=True,
                     prompt=prompt) for kv in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_schedule_invariants_and_nfe(family):
    """Every position written exactly once, decoded tokens never change, sequential tokens
    in increasing position order, NFE = number of non-empty steps."""
    model = sharp_model(family, alpha_0=0.5 if family.startswith("eso") else None)
    mask = model.config.mask_token_id
    g = generate(model, ScheduleSettings(steps=7, seed=5), num_samples=3, record_logits=True)
    # replay: every recorded step decoded as many tokens as its logits rows
    decoded = sum(step.shape[1] for step in g.step_logits)
    assert decoded == 16 and (g.tokens != mask).all()
    assert g.nfe == len(g.step_logits)
    sched = g.schedules[0]
    if family == "ar":
        assert sched is None and g.nfe == 16
        return
    scheds = sched if isinstance(sched, list) else [sched]
    for s in scheds:
        assert all(c > 0 for c in s.counts)
        n = s.order.shape[1]
        assert torch.equal(torch.sort(s.order, 1).values, torch.arange(n).expand_as(s.order))
        seq = s.order[:, s.n_given + s.n_diffusion:]
        assert (seq[:, 1:] > seq[:, :-1]).all()
    assert g.nfe == sum(s.steps for s in scheds)


@pytest.mark.parametrize("family", ["eso_a", "eso_b", "mdlm", "bd3lm"])
def test_decoded_tokens_never_change(family):
    model = sharp_model(family)
    mask = model.config.mask_token_id
    snapshots = []
    from esolm.sampling import loops

    real_call = loops.Decoder.__call__

    def spy(self, x, positions, logits):
        before = x.clone()
        real_call(self, x, positions, logits)
        changed = (before != x)
        assert not (changed & (before != mask)).any(), "a decoded token changed"
        assert changed.sum() == positions.numel(), "a position was written twice or not at all"
        snapshots.append(x.clone())

    loops.Decoder.__call__ = spy
    try:
        generate(model, ScheduleSettings(steps=6, seed=1), num_samples=2)
    finally:
        loops.Decoder.__call__ = real_call
    assert (snapshots[-1] != mask).all()


def test_schedule_counts_follow_alpha0():
    g = torch.Generator().manual_seed(0)
    diff = [make_schedule(1, 1000, 50, 0.3, generator=g).n_diffusion for _ in range(20)]
    assert abs(sum(diff) / 20 - 300) < 15
    assert make_schedule(2, 64, 8, 0.0, generator=g).counts == (1,) * 64
    s = make_schedule(2, 64, 8, 1.0, schedule="power", gamma=1.0, generator=g)
    assert s.counts == (8,) * 8 and s.n_diffusion == 64
    s = make_schedule(2, 64, 8, 1.0, schedule="power", gamma=2.0, generator=g)
    assert s.counts[0] < s.counts[-1] and sum(s.counts) == 64
    s = make_schedule(2, 16, 8, 1.0, order="block", subcontexts=4, generator=g)
    assert s.counts == (4, 4, 4, 4)
    assert s.order[0, :4].tolist() == [0, 4, 8, 12]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompt_tokens_are_kept_and_seed_is_deterministic(family):
    model = sharp_model(family)
    prompt = {0: 3, 1: 4} if family == "ar" else {0: 3, 7: 4, 15: 5}
    a = generate(model, ScheduleSettings(steps=5, seed=9), num_samples=4, prompt=prompt)
    b = generate(model, ScheduleSettings(steps=5, seed=9), num_samples=4, prompt=prompt)
    c = generate(model, ScheduleSettings(steps=5, seed=10), num_samples=4, prompt=prompt)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    for pos, tok in prompt.items():
        assert (a.tokens[:, pos] == tok).all()


def test_nucleus_never_picks_outside_the_top_p_set():
    torch.manual_seed(0)
    logits = torch.randn(64, 5, 30) * 3
    kept = torch.isfinite(nucleus_filter(logits, 0.7))
    probs = torch.softmax(logits, -1)
    # the kept set is the smallest prefix of the sorted distribution reaching 0.7
    sp = torch.sort(probs, -1, descending=True).values
    n_keep = kept.sum(-1)
    mass_before_last = sp.cumsum(-1).gather(-1, (n_keep - 2).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert ((mass_before_last < 0.7) | (n_keep == 1)).all()
    assert (probs.masked_fill(~kept, 0).sum(-1) >= 0.7 - 1e-6).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok = sample_tokens(logits, g, top_p=0.7)
        assert kept.gather(-1, tok.unsqueeze(-1)).all()


def test_mdlm_computes_logits_only_for_decoded_positions():
    model = sharp_model("mdlm")
    g = generate(model, ScheduleSettings(steps=16, seed=0), num_samples=2, record_logits=True)
    assert all(step.shape[1] < 16 for step in g.step_logits)
    assert not g.kv_cache


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"), (dict(alpha_0=1.5), "alpha_0"), (dict(order="spiral"), "order"),
    (dict(prompt={16: 1}), "outside the sequence"), (dict(prompt={0: 99}), "prompt id"),
    (dict(top_p=0.0), "top_p"), (dict(schedule="cosine"), "schedule"),
])
def test_bad_sampling_inputs_are_clear_errors(kw, match):
    prompt = kw.pop("prompt", None)
    with pytest.raises(ValueError, match=match):
        generate(sharp_model("eso_b"), ScheduleSettings(**kw), num_samples=2, prompt=prompt)


def test_ar_rejects_infilling_prompts():
    with pytest.raises(ValueError, match="prefix prompt"):
        generate(sharp_model("ar"), num_samples=1, prompt={3: 1})


def test_order_and_token_noise_are_independent():
    """Under a model whose predictions are exactly uniform, the token drawn at the first
    decoded position must not depend on that position. Seeding the order and the token
    noise alike (the old ``generate``) ties them together: on CPU both replay one Mersenne
    Twister stream, and P(token = position // 2) fell to 0.086 (chi-square p = 2e-6)."""
    from scipy.stats import chi2_contingency

    from esolm import ModelConfig, build_model

    model = build_model(ModelConfig(family="eso_b", vocab_size=8, length=16, alpha_0=1.0, n_layers=1,
                                    d_model=16, n_heads=2, cond_dim=16)).eval()
    with torch.no_grad():  # the training init (adaLN-Zero) predicts exactly uniformly
        logits = model(torch.zeros(1, 16, dtype=torch.long), torch.arange(16)[None], CAUSAL_SPEC)
    assert torch.equal(logits[..., :8], torch.zeros(1, 16, 8))
    n, table = 3000, torch.zeros(16, 8)
    for seed in range(n):
        g = generate(model, ScheduleSettings(steps=1, seed=seed), num_samples=1)
        pos = int(g.schedules[0].order[0, 0])
        table[pos, int(g.tokens[0, pos])] += 1
    hits = sum(float(table[p, p // 2]) for p in range(16)) / n
    sigma = (0.125 * 0.875 / n) ** 0.5
    assert abs(hits - 0.125) < 4 * sigma, f"P(token = position // 2) = {hits:.3f}, expected 0.125"
    assert chi2_contingency(table.numpy()).pvalue > 1e-3, table


def test_block_order_matches_the_reference_shuffle():
    """shared (the reference): every step decodes one within-chunk offset in every chunk, the
    same offset in all chunks, one order for the whole batch; settings record what ran."""
    from esolm.ordering import block_steps

    free = torch.arange(16).expand(3, 16)
    g = torch.Generator().manual_seed(0)
    order, counts = block_steps(free, 16, 4, True, g)
    assert counts == [4, 4, 4, 4] and torch.equal(order[0], order[1]) and torch.equal(order[0], order[2])
    steps = order[0].view(4, 4)  # one row per step
    offsets = steps % 4
    assert all(len(set(row.tolist())) == 1 for row in offsets)  # one offset per step
    assert sorted(offsets[:, 0].tolist()) == [0, 1, 2, 3]
    assert all(sorted((row // 4).tolist()) == [0, 1, 2, 3] for row in steps)  # every chunk once
    firsts = {tuple(block_steps(free, 16, 4, True, torch.Generator().manual_seed(k))[0][0, :4].tolist())
              for k in range(8)}
    assert len(firsts) > 1  # the offsets and chunk orders are really shuffled
    per_chunk, _ = block_steps(free, 16, 4, "per_chunk", torch.Generator().manual_seed(0))
    assert not torch.equal(per_chunk[0], per_chunk[1])  # the old option: its own order per row
    model = sharp_model("eso_b", alpha_0=1.0)
    gen = generate(model, ScheduleSettings(steps=50, order="block", subcontexts=4, shuffle=True), num_samples=2)
    assert gen.settings["steps"] == 4 and gen.settings["schedule"] is None
    assert gen.settings["gamma"] is None and gen.settings["shuffle"] == "shared"
    with pytest.raises(ValueError, match="shuffle='sideways' is unknown"):
        generate(model, ScheduleSettings(order="block", shuffle="sideways"))
