"""esolm: Esoteric Language Models (Eso-LMs) and their baselines in one backbone."""

from esolm.config import ModelConfig
from esolm.likelihood import iw_log_prob, order_log_prob
from esolm.model import Backbone
from esolm.objectives import LossOutput, loss
from esolm.sampling import Generation, generate


def build_model(cfg: ModelConfig) -> Backbone:
    """The backbone for ``cfg`` with random (normal, non-zero) initial weights."""
    return Backbone(cfg)


__all__ = ["Backbone", "Generation", "LossOutput", "ModelConfig", "build_model", "generate",
           "iw_log_prob", "loss", "order_log_prob"]
