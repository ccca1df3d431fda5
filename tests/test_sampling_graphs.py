"""Static-cache decode steps (the CUDA-graph path) against the dynamic cached path: eagerly
on CPU, and captured as CUDA graphs where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from esolm import generate
from esolm.model.attention import MaskSpec
from tests.conftest import sharp_model


@pytest.mark.parametrize("variant", ["eso_b", "ar"])
@pytest.mark.parametrize("opts", [dict(steps=16), dict(steps=5), dict(steps=5, prompt={0: 1, 1: 2})])
def test_static_cache_steps_equal_the_dynamic_cached_path(variant, opts):
    """Same seed: identical tokens, per-step logits within 1e-5 (the static step attends over
    the whole buffer, masked, so sums may run in another order)."""
    kw = dict(alpha_0=0.5) if variant == "eso_b" else {}
    model = sharp_model(variant, **kw)
    runs = [generate(model, num_samples=3, seed=4, record_logits=True, cuda_graphs=g, **opts)
            for g in (False, True)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].nfe == runs[1].nfe
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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
    runs = [generate(model, num_samples=3, steps=8, seed=4, record_logits=True, cuda_graphs=g)
            for g in (False, True)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for a, b in zip(runs[0].step_logits, runs[1].step_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
