"""The two training initialisations (``model.init``): the reference's adaLN-Zero and plain Normal."""

import pytest
import torch

from esolm.config import INITS, ModelConfig
from esolm.model.backbone import Backbone


def _zeroed(model: Backbone) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if name.endswith("weight") and not p.any())


def test_adaln_zero_zeroes_modulations_and_head_and_normal_zeroes_nothing():
    torch.manual_seed(0)
    zero = Backbone(ModelConfig(family="mdlm", vocab_size=11, length=8, d_model=16, n_heads=2))
    assert "head.weight" in _zeroed(zero) and "modulation_out.weight" in _zeroed(zero)
    assert all(f"blocks.{i}.modulation.weight" in _zeroed(zero) for i in range(2))
    torch.manual_seed(0)
    normal = Backbone(ModelConfig(family="mdlm", vocab_size=11, length=8, d_model=16, n_heads=2, init="normal"))
    assert _zeroed(normal) == []
    std = torch.cat([p.flatten() for n, p in normal.named_parameters() if n.endswith("weight") and p.dim() == 2]).std()
    assert 0.015 < float(std) < 0.025  # Normal(0, 0.02)
    assert set(INITS) == {"adaln_zero", "normal"}


def test_an_unknown_init_is_a_clear_error():
    with pytest.raises(ValueError, match="init"):
        ModelConfig(family="mdlm", init="xavier")
