"""Static-cache decode steps (the CUDA-graph path) against the dynamic cached path: eagerly
on CPU, compiled with torch.compile on CPU, and captured as CUDA graphs where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from esolm import generate
from esolm.config import ScheduleSettings
from esolm.model.attention import AttentionMask
from tests.conftest import sharp_model


def _same_as_dynamic(model, mode, atol=1e-5, **opts):
    """Same seed: identical tokens, per-step logits within atol (the static step attends over
    the whole buffer, masked, so sums may run in another order)."""
    prompt = opts.pop("prompt", None)
    runs = [generate(model, ScheduleSettings(seed=4, step_mode=m, **opts), num_samples=3, record_logits=True,
                     prompt=prompt)
            for m in ("dynamic", mode)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].nfe == runs[1].nfe
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    return runs


@pytest.mark.parametrize("mode", ["static", "cuda_graphs"])  # on CPU cuda_graphs runs the static steps
@pytest.mark.parametrize("family", ["eso_b", "ar"])
@pytest.mark.parametrize("opts", [dict(steps=16), dict(steps=5), dict(steps=5, prompt={0: 1, 1: 2})])
def test_static_cache_steps_equal_the_dynamic_cached_path(family, opts, mode):
    kw = dict(alpha_0=0.5) if family == "eso_b" else {}
    _same_as_dynamic(sharp_model(family, **kw), mode, **opts)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["eso_b", "ar"])
def test_compiled_decode_steps_equal_the_dynamic_cached_path_on_cpu(family):
    """The decode step through torch.compile (inductor, CPU): compiled once per step shape,
    never per cache length, and the same tokens as the eager dynamic path."""
    import torch._dynamo

    torch._dynamo.reset()
    kw = dict(alpha_0=0.5) if family == "eso_b" else {}
    model = sharp_model(family, **kw)
    torch._dynamo.utils.counters.clear()
    _same_as_dynamic(model, "compile", atol=1e-4, steps=16)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, dict(torch._dynamo.utils.counters["stats"])  # step shapes, not cache lengths


def test_an_unknown_step_mode_names_the_modes():
    with pytest.raises(ValueError, match="use one of"):
        generate(sharp_model("ar"), ScheduleSettings(step_mode="graphs"), num_samples=1)


def test_static_cache_serves_causal_steps_only():
    model = sharp_model("bd3lm")
    cache = model.new_cache(1).make_static()
    with pytest.raises(ValueError, match="causal decode steps only"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], AttentionMask("block_causal", block=4),
              cache=cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["eso_b", "ar"])
def test_cuda_graph_steps_equal_the_eager_cached_path_on_gpu(family):
    kw = dict(alpha_0=0.5) if family == "eso_b" else {}
    model = sharp_model(family, **kw).to(torch.device("cuda", 0))
    runs = [generate(model, ScheduleSettings(steps=8, seed=4, step_mode=m), num_samples=3, record_logits=True)
            for m in ("dynamic", "cuda_graphs")]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- reuse and buckets

def test_static_steps_are_made_once_per_model_and_reused_across_generations(monkeypatch):
    """``StaticSteps`` was rebuilt by every ``generate`` (on a GPU: 2-3 captures inside each
    timed run). Now one per (model, batch, mode, dtype): the second and third generations reuse
    it, rewound, and still give the dynamic path's tokens."""
    import esolm.sampling.graphs as graphs

    made = []
    real = graphs.StaticSteps.__init__
    monkeypatch.setattr(graphs.StaticSteps, "__init__", lambda self, *a, **k: (made.append(1), real(self, *a, **k))[1])
    model = sharp_model("eso_b", alpha_0=0.5)
    for seed in (1, 2, 3):
        runs = [generate(model, ScheduleSettings(steps=6, seed=seed, step_mode=m), num_samples=3)
                for m in ("dynamic", "static")]
        assert torch.equal(runs[0].tokens, runs[1].tokens), seed
    assert len(made) == 1
    generate(model, ScheduleSettings(steps=6, seed=1, step_mode="static"), num_samples=2)  # another batch: its own
    assert len(made) == 2


def test_reused_static_steps_see_new_weights():
    """A weight written in place between generations (an optimizer step, ``load_state_dict``)
    changes the conditioning: the reused steps take the new values, never stale ones."""
    model = sharp_model("ar")
    generate(model, ScheduleSettings(seed=0, step_mode="static"), num_samples=2)
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.bias.add_(torch.randn_like(block.modulation.bias))
    runs = [generate(model, ScheduleSettings(seed=0, step_mode=m), num_samples=2, record_logits=True)
            for m in ("dynamic", "static")]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["eso_b", "ar"])
@pytest.mark.parametrize("opts", [dict(steps=7, schedule="loglinear"), dict(steps=5, prompt={0: 1, 1: 2, 2: 3})])
def test_bucketed_steps_pad_drop_and_equal_the_dynamic_path(monkeypatch, family, opts):
    """The CUDA-graph path pads each step's tokens to a power of two (scratch slots, never
    committed, logits dropped) so that a log-linear schedule captures a few graphs, not one per
    step size. Run here on CPU through the same static step: same tokens and logits as the
    dynamic path, and few distinct step shapes."""
    import esolm.sampling.graphs as graphs

    monkeypatch.setattr(graphs, "BUCKET", True)
    shapes = set()
    real = graphs.StaticSteps._eager
    monkeypatch.setattr(graphs.StaticSteps, "_eager",
                        lambda self, tokens, *a: (shapes.add(tuple(tokens.shape)), real(self, tokens, *a))[1])
    kw = dict(alpha_0=0.5) if family == "eso_b" else {}
    runs = _same_as_dynamic(sharp_model(family, **kw), "static", **opts)
    assert runs[1].nfe > len(shapes)
    assert all(n & (n - 1) == 0 or n == runs[1].tokens.shape[1] for _, n in shapes), shapes


def test_bucketed_padding_never_runs_past_the_cache():
    """Near the end of the sequence the padded size is capped by the room left in the cache."""
    import esolm.sampling.graphs as graphs

    model = sharp_model("eso_b", alpha_0=1.0)
    L = model.config.length
    steps = graphs.StaticSteps(model, model.new_cache(1, max_len=L), model.conditioning(), "static", bucket=True)
    with torch.no_grad():
        steps(torch.zeros(1, L - 3, dtype=torch.long), torch.arange(L - 3)[None], L - 3, 0)
        out = steps(torch.zeros(1, 3, dtype=torch.long), torch.arange(L - 3, L)[None], 0, 1)
    assert out.shape[:2] == (1, 2) and steps.cache.length == L - 3
