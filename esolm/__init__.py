"""esolm: Esoteric Language Models (Eso-LMs) and their baselines in one backbone."""

from esolm.config import ModelConfig
from esolm.model import Backbone
from esolm.objectives import LossOutput, loss


def build_model(cfg: ModelConfig) -> Backbone:
    """The backbone for ``cfg`` with random (normal, non-zero) initial weights."""
    return Backbone(cfg)


__all__ = ["Backbone", "LossOutput", "ModelConfig", "build_model", "loss"]
