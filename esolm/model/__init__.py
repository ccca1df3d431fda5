"""Backbone, attention and masks, KV cache."""

from esolm.model.attention import AttentionMask, attention, dense_mask, mask_function
from esolm.model.backbone import Backbone
from esolm.model.cache import KVCache

__all__ = ["AttentionMask", "Backbone", "KVCache", "attention", "dense_mask", "mask_function"]
