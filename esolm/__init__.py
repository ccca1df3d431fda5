"""esolm: Esoteric Language Models (Eso-LMs) and their baselines in one backbone.

The public names below load on first use (PEP 562), so ``import esolm.cli`` or any other
submodule runs only the modules it needs: what DVC's stage dependencies rely on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "ModelConfig": "esolm.config", "iw_log_prob": "esolm.likelihood", "order_log_prob": "esolm.likelihood",
    "Backbone": "esolm.model.backbone", "LossOutput": "esolm.objectives", "loss": "esolm.objectives",
    "Generation": "esolm.sampling", "generate": "esolm.sampling", "generate_text": "esolm.text",
    "ScheduleSettings": "esolm.config",
    "load": "esolm.text",
}

if TYPE_CHECKING:
    from esolm.config import ModelConfig
    from esolm.model.backbone import Backbone


def build_model(cfg: ModelConfig) -> Backbone:
    """The backbone for ``cfg`` with the training initialisation (adaLN-Zero: modulations and
    output layer zero, so predictions start uniform; other weights Normal(0, 0.02))."""
    from esolm.model.backbone import Backbone

    return Backbone(cfg)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'esolm' has no attribute {name!r}")


__all__ = ["Backbone", "Generation", "LossOutput", "ModelConfig", "ScheduleSettings", "build_model", "generate",
           "generate_text", "iw_log_prob", "load", "loss", "order_log_prob"]
