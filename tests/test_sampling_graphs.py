"""Static-cache decode steps (the CUDA-graph path) against the dynamic cached path: eagerly
on CPU, compiled with torch.compile on CPU, and captured as CUDA graphs where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from esolm import generate
from esolm.model.attention import MaskSpec
from tests.conftest import sharp_model


def _same_as_dynamic(model, mode, atol=1e-5, **opts):
    """Same seed: identical tokens, per-step logits within atol (the static step attends over
    the whole buffer, masked, so sums may run in another order)."""
    runs = [generate(model, num_samples=3, seed=4, record_logits=True, step_mode=m, **opts)
            for m in ("dynamic", mode)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].nfe == runs[1].nfe
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    return runs


@pytest.mark.parametrize("mode", ["static", "cuda_graphs"])  # on CPU cuda_graphs runs the static steps
@pytest.mark.parametrize("variant", ["eso_b", "ar"])
@pytest.mark.parametrize("opts", [dict(steps=16), dict(steps=5), dict(steps=5, prompt={0: 1, 1: 2})])
def test_static_cache_steps_equal_the_dynamic_cached_path(variant, opts, mode):
    kw = dict(alpha_0=0.5) if variant == "eso_b" else {}
    _same_as_dynamic(sharp_model(variant, **kw), mode, **opts)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["eso_b", "ar"])
def test_compiled_decode_steps_equal_the_dynamic_cached_path_on_cpu(variant):
    """The decode step through torch.compile (inductor, CPU): compiled once per step shape,
    never per cache length, and the same tokens as the eager dynamic path."""
    import torch._dynamo

    torch._dynamo.reset()
    kw = dict(alpha_0=0.5) if variant == "eso_b" else {}
    model = sharp_model(variant, **kw)
    torch._dynamo.utils.counters.clear()
    _same_as_dynamic(model, "compile", atol=1e-4, steps=16)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, dict(torch._dynamo.utils.counters["stats"])  # step shapes, not cache lengths


def test_an_unknown_step_mode_names_the_modes():
    with pytest.raises(ValueError, match="use one of"):
        generate(sharp_model("ar"), num_samples=1, step_mode="graphs")


def test_static_cache_serves_causal_steps_only():
    model = sharp_model("bd3lm")
    cache = model.new_cache(1).make_static()
    with pytest.raises(ValueError, match="causal decode steps only"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], MaskSpec("block_causal", block=4),
              cache=cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["eso_b", "ar"])
def test_cuda_graph_steps_equal_the_eager_cached_path_on_gpu(variant):
    kw = dict(alpha_0=0.5) if variant == "eso_b" else {}
    model = sharp_model(variant, **kw).to(torch.device("cuda", 0))
    runs = [generate(model, num_samples=3, steps=8, seed=4, record_logits=True, step_mode=m)
            for m in ("dynamic", "cuda_graphs")]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
