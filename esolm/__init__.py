"""esolm: Esoteric Language Models (Eso-LMs) and their baselines in one backbone."""

from esolm.config import ModelConfig
from esolm.likelihood import iw_log_prob, order_log_prob
from esolm.model import Backbone
from esolm.objectives import LossOutput, loss
from esolm.sampling import Generation, generate
from esolm.text import generate_text, load


def build_model(cfg: ModelConfig) -> Backbone:
    """The backbone for ``cfg`` with the training initialisation (adaLN-Zero: modulations and
    output layer zero, so predictions start uniform; other weights Normal(0, 0.02))."""
    return Backbone(cfg)


__all__ = ["Backbone", "Generation", "LossOutput", "ModelConfig", "build_model", "generate",
           "generate_text", "iw_log_prob", "load", "loss", "order_log_prob"]
