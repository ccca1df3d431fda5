"""The authors' published checkpoints: their DiT parameter layout mapped onto our backbone.

The published MDLM, BD3-LM, Eso-LM and AR models (and the authors' Lightning files) share one
layout, a DiT (``vocab_embed``, ``sigma_map``, ``blocks.i.{norm1, attn_qkv, attn_out, mlp,
adaLN_modulation}``, ``output_layer``). It maps one to one onto ``esolm.model.backbone``:

- the qkv projection is laid out ``(three, heads, head_dim)`` in both; LayerNorms are
  weight-only in both (eps 1e-5); the adaLN chunks are (shift, scale, gate) x 2 and the output
  layer's (shift, scale) in both, applied as ``norm(h) * (1 + scale) + shift``;
- rotary: both rotate the pairs (first half, second half) of each head with
  ``inv_freq = base ** (-2i / head_dim)``, base 10000 (checked against ``rotary_emb.inv_freq``);
- ``sigma_map`` is our ``TimeEmbedding`` MLP (256 frequencies). Our sinusoid scales t by 1000
  and theirs does not, so the two agree at t = 0 only: every published model is
  time-invariant (``time_conditioning: false``: sigma = 0), as are ours;
- the AR baseline's blocks have no adaLN and it has no ``sigma_map``: it maps to an identity
  modulation (zero weights; bias 0 for shift and scale, 1 for the gates) and a zero time MLP,
  exactly the same function. The reverse refuses an AR model whose modulation is not identity.

The mask token is the last row (``mask_index``); its logit is -inf in our head (the authors'
may hold any value). ``esolm.published_io`` reads folders, hub ids and Lightning files.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from esolm.config import ModelConfig

TIME_FREQUENCIES = 256  # sigma_map's frequency_embedding_size == TimeEmbedding's n_freq
PREFIX = "backbone."

# the published ``model_type`` (lower-cased) or Lightning ``algo.name`` -> our family name
MODEL_TYPES = {"esolm": "eso_b", "mdlm": "mdlm", "bd3lm": "bd3lm", "ar": "ar"}
# an Eso-LM's Lightning ``algo.diffusion_attn_mode`` -> our family (causal: (B); clean tokens
# bidirectional, masks causal: (A))
ESO_ATTENTION = {"causal": "eso_b", "mixed2": "eso_a"}


def names(n_layers: int) -> dict[str, str]:
    """Our parameter name -> the DiT's (without ``backbone.``), in the DiT's
    ``parameters()`` order (the order of a Lightning file's ``ema.shadow_params``)."""
    out = {"embed.weight": "vocab_embed.embedding"}
    out.update({f"time.mlp.{i}.{p}": f"sigma_map.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")})
    for i in range(n_layers):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": b + "norm1.weight", b + "qkv.weight": b + "attn_qkv.weight",
                    b + "proj.weight": b + "attn_out.weight", b + "norm2.weight": b + "norm2.weight"})
        out.update({f"{b}mlp.{j}.{p}": f"{b}mlp.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")})
        out.update({b + f"modulation.{p}": b + f"adaLN_modulation.{p}" for p in ("weight", "bias")})
    out.update({"norm_out.weight": "output_layer.norm_final.weight",
                "head.weight": "output_layer.linear.weight", "head.bias": "output_layer.linear.bias",
                "modulation_out.weight": "output_layer.adaLN_modulation.weight",
                "modulation_out.bias": "output_layer.adaLN_modulation.bias"})
    return out


def is_adaln(ours: str) -> bool:
    """Whether our parameter ``ours`` belongs to the time conditioning (absent in the AR layout)."""
    return ours.startswith(("time.", "modulation_out.")) or ".modulation." in ours


def has_adaln(dit: dict[str, Tensor]) -> bool:
    return any("adaLN_modulation" in k for k in dit)


def inv_freq(head_dim: int, base: float = 10000.0) -> Tensor:
    """The authors' rotary buffer ``rotary_emb.inv_freq`` (float32)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def identity_modulation(cfg: ModelConfig) -> dict[str, Tensor]:
    """Our time MLP and modulations that make every block and the output layer unmodulated."""
    d, c = cfg.d_model, cfg.cond_dim
    gate = torch.zeros(6, d)
    gate[[2, 5]] = 1.0  # (shift, scale, gate, shift, scale, gate): gates 1, the rest 0
    out = {"time.mlp.0.weight": torch.zeros(c, TIME_FREQUENCIES), "time.mlp.0.bias": torch.zeros(c),
           "time.mlp.2.weight": torch.zeros(c, c), "time.mlp.2.bias": torch.zeros(c),
           "modulation_out.weight": torch.zeros(2 * d, c), "modulation_out.bias": torch.zeros(2 * d)}
    for i in range(cfg.n_layers):
        out[f"blocks.{i}.modulation.weight"] = torch.zeros(6 * d, c)
        out[f"blocks.{i}.modulation.bias"] = gate.reshape(-1).clone()
    return out


def strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``backbone.`` entries of a state dict, without the prefix."""
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def to_esolm(dit: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """(our state dict in float32, the DiT entries left out as derived buffers) of DiT weights
    ``dit`` (no prefix). A missing or unexpected parameter is an error naming it."""
    mapping = names(cfg.n_layers)
    adaln = has_adaln(dit)
    out = {} if adaln else identity_modulation(cfg)
    for ours, theirs in mapping.items():
        if not adaln and is_adaln(ours):
            continue
        if theirs not in dit:
            raise ValueError(f"the checkpoint has no {PREFIX}{theirs}: it is not in the authors' DiT layout")
        out[ours] = dit[theirs].detach().to(torch.float32).clone()
    skipped = sorted(set(dit) - set(mapping.values()))
    for key in skipped:
        if key == "rotary_emb.inv_freq":
            if not torch.allclose(dit[key].float(), inv_freq(cfg.head_dim), rtol=1e-6, atol=0):
                raise ValueError(f"{PREFIX}{key} is not base-10000 rotary of head size {cfg.head_dim}")
        elif "mask" not in key:  # BD3-LM folders carry attention-mask buffers, rebuilt here
            raise ValueError(f"unexpected parameter {PREFIX}{key}: not in the authors' DiT layout")
    return out, skipped


def to_dit(weights: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The authors' DiT state dict (with ``backbone.``) of our weights; the AR layout has no
    adaLN, so an autoregressive model must carry the identity modulation."""
    adaln = not cfg.family_record.autoregressive
    if not adaln:
        ident = identity_modulation(cfg)
        for k, v in ident.items():
            if not torch.equal(weights[k].float(), v):
                raise ValueError(f"{k} is not the identity modulation: the authors' AR layout (no adaLN) "
                                 "cannot hold this model")
    out = {PREFIX + theirs: weights[ours].detach().contiguous()
           for ours, theirs in names(cfg.n_layers).items() if adaln or not is_adaln(ours)}
    out[PREFIX + "rotary_emb.inv_freq"] = inv_freq(cfg.head_dim)
    return out


def ema_to_dit(shadow: list[Tensor], state: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """DiT weights (no prefix) of a Lightning file's ``ema.shadow_params``, a list in the order
    of the authors' ``backbone.parameters()``; ``state`` (its raw state dict, no prefix) says
    which parameters exist and checks every shape."""
    order = [n for n in names(n_layers).values() if n in state]
    if len(order) != len(shadow):
        raise ValueError(f"ema.shadow_params holds {len(shadow)} tensors but the backbone has "
                         f"{len(order)} parameters: it is not this model's EMA")
    for name, tensor in zip(order, shadow):
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(f"ema.shadow_params: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(state[name].shape)}")
    return dict(zip(order, shadow))


def alpha_from_name(name: str) -> float | None:
    """alpha_0 written in a published name: 'Eso-LM-B-alpha-0_25' -> 0.25, '...-alpha-1' -> 1.0."""
    m = re.search(r"alpha[-_]?0?(\d+(?:[._]\d+)?)", name)
    return None if m is None else float(m.group(1).replace("_", "."))


def width(hf: dict) -> int:
    """The model width of a published config: ``hidden_size`` (Eso-LM) or ``hidden_dim``
    (MDLM, BD3-LM)."""
    for key in ("hidden_size", "hidden_dim"):
        if key in hf:
            return int(hf[key])
    raise ValueError("the config has neither hidden_size nor hidden_dim: not an authors' DiT config")


def export_config(cfg: ModelConfig, fmt: str) -> dict:
    """config.json of the authors' layout for ``cfg``: their ``model_type`` and key names
    (Eso-LM: ``hidden_size`` and ``mask_index``; MDLM, BD3-LM, AR: ``hidden_dim``), plus an
    ``esolm`` entry (format, family, alpha_0, batch split) that their loaders ignore."""
    rec = cfg.family_record
    kind = ("ar" if rec.autoregressive else "bd3lm" if rec.blocks
            else "mdlm" if rec.fixed_alpha_0 == 1.0 else "EsoLM")
    key = "hidden_size" if kind == "EsoLM" else "hidden_dim"
    out = {"architectures": [{"ar": "AR", "bd3lm": "BD3LM", "mdlm": "MDLM"}.get(kind, kind)],
           "model_type": kind, "vocab_size": cfg.n_embed, "mask_index": cfg.mask_token_id,
           "model_length": cfg.length, key: cfg.d_model, "cond_dim": cfg.cond_dim,
           "n_blocks": cfg.n_layers, "n_heads": cfg.n_heads, "dropout": cfg.dropout,
           "time_conditioning": False, "torch_dtype": "float32"}
    if rec.blocks:
        out.update(block_size=cfg.block_size, adaln=True, cross_attn=True, causal=False)
    if rec.autoregressive:
        out.update(causal=True, adaln=False)
    out["esolm"] = {"format": fmt, "family": cfg.family, "alpha_0": cfg.alpha_0,
                    "batch_split": cfg.batch_split, "mlp_ratio": cfg.mlp_ratio}
    return out
