"""The one backbone: a DiT-style transformer with rotary positions that follow a permutation.

Pre-LayerNorm blocks with adaLN modulation from a time embedding (Eso-LMs are time
invariant and feed t = 0), GELU MLP, untied input/output embeddings, dropout
(method.md section 3). Every family uses this module; they differ only in the tokens,
positions and ``AttentionMask`` they feed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esolm.config import ModelConfig
from esolm.model.attention import AttentionMask, attention, check_backend, prebuild
from esolm.model.cache import KVCache


class Rotary(nn.Module):
    """Rotary embedding evaluated at arbitrary (permuted) integer positions.

    The angles are computed once in float64 for positions [0, n) and kept as tables per
    (device, dtype); a forward only indexes them, so a decode step costs two gathers.
    The tables live outside the module's buffers: ``model.to(dtype)`` never rounds them.
    """

    def __init__(self, head_dim: int, base: float, length: int) -> None:
        super().__init__()
        self.head_dim, self.base, self.length = head_dim, base, length
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def tables(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(C, S), each [n' >= n, head_dim]: C = [cos, cos], S = [-sin, sin] of position x freq."""
        key = (device, dtype)
        have = self._tables.get(key)
        if have is None or have[0].shape[0] < n:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                                            / self.head_dim))
            angles = torch.arange(max(n, self.length), dtype=torch.float64)[:, None] * inv_freq
            cos, sin = angles.cos(), angles.sin()
            have = (torch.cat((cos, cos), -1).to(device, dtype), torch.cat((-sin, sin), -1).to(device, dtype))
            self._tables[key] = have
        return have

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, N] (values below max(length, N)) -> (C, S), each [B, N, 1, 1, head_dim],
        broadcastable over the (q/k, head) axes of a [B, N, 2, H, head_dim] tensor."""
        c, s = self.tables(positions.shape[1], positions.device, dtype)
        B, N = positions.shape
        flat = positions.reshape(-1)
        shape = (B, N, 1, 1, self.head_dim)
        return c.index_select(0, flat).view(shape), s.index_select(0, flat).view(shape)


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype the matmuls produce on ``device``: autocast's when autocast is on there (bf16
    training), else ``stored`` (the weights' dtype). Rotary tables and the KV cache use it, so
    that q, k and v reach attention in one dtype and a bf16 cache takes half the memory."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return stored


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) = (first half, second half) of the last (head) dimension:
    (x1 cos - x2 sin, x2 cos + x1 sin) = x * C + swap(x) * S with the tables of ``Rotary``.
    x: [..., D]; cos, sin: C and S broadcastable to x."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, sin)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by an MLP: t [B] -> [B, cond_dim]."""

    def __init__(self, cond_dim: int, n_freq: int = 256) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float().unsqueeze(-1) * freqs
        feats = torch.cat((args.cos(), args.sin()), dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class Modulation(NamedTuple):
    """adaLN modulation of one block for times t, each [B or 1, 1, d]; scales are stored as
    1 + scale so that modulating is one ``addcmul``: norm(h) * (1 + scale) + shift."""

    shift1: Tensor
    scale1: Tensor
    gate1: Tensor
    shift2: Tensor
    scale2: Tensor
    gate2: Tensor


def modulation(layer: nn.Linear, c: Tensor, parts: int) -> tuple[Tensor, ...]:
    """``parts`` chunks of layer(c) [B, parts * d], each a [B, 1, d] view, with every
    scale (positions 1 and 4 of (shift, scale, gate, shift, scale, gate)) returned as 1 + scale."""
    chunks = layer(c)[:, None].chunk(parts, dim=-1)
    return tuple((1 + x) if i % 3 == 1 else x for i, x in enumerate(chunks))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.backend = cfg.n_heads, cfg.attn_backend
        self.norm1 = nn.LayerNorm(d, bias=False)
        self.norm2 = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d)
        )
        self.modulation = nn.Linear(cfg.cond_dim, 6 * d)
        self.drop = nn.Dropout(cfg.dropout)

    def _drop(self, x: Tensor) -> Tensor:
        return self.drop(x) if self.training and self.drop.p > 0 else x

    def forward(self, h: Tensor, mod: Modulation, rope: tuple[Tensor, Tensor], mask: AttentionMask,
                cache: tuple[Tensor, Tensor, int | Tensor, int] | None) -> Tensor:
        """h: [B, N, d]; mod: this block's adaLN modulation (``Backbone.conditioning``);
        rope: (C, S) of ``Rotary``; cache: (k_buf, v_buf, start, commit) or None, where start
        is the first cache slot (int) or, for a static cache, the slots of the N tokens [N].

        Written with functional calls and fused ``addcmul`` so that a small cached decode step
        dispatches few operators: rotary is applied to q and k in one pass."""
        d = h.shape[-1]
        x = torch.addcmul(mod.shift1, F.layer_norm(h, (d,), self.norm1.weight), mod.scale1)
        B, N, _ = x.shape
        qkv = F.linear(x, self.qkv.weight).view(B, N, 3, self.n_heads, d // self.n_heads)
        q, k = apply_rotary(qkv[:, :, :2], *rope).transpose(1, 3).unbind(2)  # [B, H, N, D] each
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            k_buf, v_buf, start, _ = cache
            if isinstance(start, Tensor):  # static cache: device-side slots [N], whole buffer
                k_buf.index_copy_(2, start, k)
                v_buf.index_copy_(2, start, v)
                k, v = k_buf, v_buf
            else:
                k_buf.narrow(2, start, N).copy_(k)
                v_buf.narrow(2, start, N).copy_(v)
                k, v = k_buf.narrow(2, 0, start + N), v_buf.narrow(2, 0, start + N)
        a = attention(q, k, v, mask, self.backend).transpose(1, 2).reshape(B, N, d)
        h = torch.addcmul(h, mod.gate1, self._drop(F.linear(a, self.proj.weight)))
        x = torch.addcmul(mod.shift2, F.layer_norm(h, (d,), self.norm2.weight), mod.scale2)
        up, act, down = self.mlp
        x = F.linear(act(F.linear(x, up.weight, up.bias)), down.weight, down.bias)
        return torch.addcmul(h, mod.gate2, self._drop(x))


# per-block modulations, then (shift, 1 + scale) of the output layer, each [B or 1, 1, d]
Conditioning = tuple[list[Modulation], tuple[Tensor, ...]]


class Backbone(nn.Module):
    """``model(tokens, positions, mask) -> logits`` for every family.

    tokens, positions: LongTensor[B, N] (positions are original positions, so a permuted
    input carries permuted rotary phases); mask: the attention mask over these N tokens.
    With ``cache``, the N tokens are appended after ``cache.length`` cached keys and attend
    to all of them as the mask allows; the first ``commit`` tokens' K/V are then kept.
    ``logits_for`` selects the tokens whose logits are computed, as a slice or a
    LongTensor[B, k] of indices (the output layer dominates small models). Logits are float32
    with the mask id at -inf (zero-masking).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.n_embed, cfg.d_model)
        self.time = TimeEmbedding(cfg.cond_dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.length)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model, bias=False)
        self.modulation_out = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_embed)
        self._frozen_mods: Conditioning | None = None  # set only inside inference()
        check_backend(cfg.attn_backend)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """The training initialisation of the reference (method.md section 7): Normal(0, std)
        weights and zero biases, then adaLN-Zero: every adaLN modulation (of the blocks and of
        the output layer) and the output layer itself start at zero, so every block starts as
        the identity and every prediction is uniform at step 0. Tests that check equalities
        must randomise all weights themselves: on this init they would hold trivially. With
        ``init: normal`` (``config.INITS``) nothing is zeroed after the Normal draw."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.config.init == "normal":
            return
        for module in (*(b.modulation for b in self.blocks), self.modulation_out, self.head):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, positions: Tensor, mask: AttentionMask, t: Tensor | None = None,
                cache: KVCache | None = None, commit: int = 0,
                logits_for: slice | Tensor = slice(None), cond: Conditioning | None = None) -> Tensor:
        """cond: the modulations of ``conditioning`` computed once by the caller (a sampler
        computes them once per generation); None computes them here from t."""
        if cond is None:
            cond = self._constant_modulations(tokens.device) if t is None else self._modulations(t)
        mods, (shift, scale) = cond
        h = self.embed(tokens)  # no dropout on the token embedding (as the reference)
        rope = self.rotary(positions, compute_dtype(h.device, h.dtype))
        n = tokens.shape[1]
        start: int | Tensor = 0
        if cache is not None and cache.pos is not None:
            start, mask = self._static_slots(cache, mask, n)
        else:
            if cache is not None:
                start = cache.length
                cache.check_room(n)
                mask = replace(mask, q_offset=start)
            mask = prebuild(mask, tokens.shape[0], n, start + n, tokens.device, self.config.attn_backend)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], start, commit)
            h = block(h, mods[i], rope, mask, layer_cache)
        if cache is not None:  # a static cache's host-side length is kept by its caller (StaticSteps)
            if cache.pos is not None:
                cache.pos.add_(commit)
            else:
                cache.length += commit
        if isinstance(logits_for, Tensor):  # LongTensor[B, k] of token indices
            h = h.gather(1, logits_for.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        else:
            h = h[:, logits_for]
        d = h.shape[-1]
        x = torch.addcmul(shift, F.layer_norm(h, (d,), self.norm_out.weight), scale)
        logits = F.linear(x, self.head.weight, self.head.bias).float()
        logits[..., self.config.mask_token_id] = float("-inf")
        return logits

    @staticmethod
    def _static_slots(cache: KVCache, mask: AttentionMask, n: int) -> tuple[Tensor, AttentionMask]:
        """Slots pos + [0, n) of n tokens in a static cache and their causal mask over the
        whole buffer ([n, capacity]: key j visible iff j <= the query's slot). No host-side
        value is read here (the caller checks the room), so a compiled step never recompiles
        as the cache fills."""
        if mask.kind != "causal" or mask.keep is not None:
            raise ValueError(f"a static KV cache serves causal decode steps only, not {mask.kind!r}")
        slots = cache.pos + cache.slots[:n]
        return slots, replace(mask, dense=cache.slots[None, :] <= slots[:, None])

    def conditioning(self, t: Tensor | None = None) -> Conditioning:
        """The adaLN modulations of every block and of the output layer for times t [B or 1]
        (None: t = 0, one row broadcast over the batch, for time-invariant models)."""
        if t is None:
            return self._constant_modulations(next(self.parameters()).device)
        return self._modulations(t)

    def _modulations(self, t: Tensor) -> Conditioning:
        """adaLN modulations of every block, then (shift, 1 + scale) of the output layer."""
        c = F.silu(self.time(t))
        return ([Modulation(*modulation(block.modulation, c, 6)) for block in self.blocks],
                modulation(self.modulation_out, c, 2))

    def _constant_modulations(self, device: torch.device) -> Conditioning:
        """The t = 0 modulations (time-invariant models), one row broadcast over the batch:
        the ones frozen by ``inference()`` when inside it, else computed now (never a hidden
        cache that a weight write through ``.data`` or a fused optimizer could leave stale)."""
        if self._frozen_mods is not None and not torch.is_grad_enabled():
            return self._frozen_mods
        return self._modulations(torch.zeros(1, device=device))

    @contextmanager
    def inference(self) -> Iterator[Backbone]:
        """Eval mode and no autograd for one sampling or evaluation call; the t = 0 adaLN
        modulations are computed once on entry and reused by every forward inside (decode
        steps skip the time MLP and the modulation layers). On exit the caller's mode is
        restored and the frozen modulations are dropped, so a later weight write (through
        ``.data``, a fused optimizer, ``load_state_dict``) can never meet stale ones.
        Re-entrant: a nested call reuses the outer one's modulations."""
        if self._frozen_mods is not None:
            yield self
            return
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self._frozen_mods = self._modulations(torch.zeros(1, device=self.head.weight.device))
                yield self
        finally:
            self._frozen_mods = None
            self.train(was_training)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A static KV cache for ``batch`` rows and ``max_len`` tokens (default: the model length),
        in the compute dtype (``compute_dtype``: bf16 under bf16 autocast)."""
        p = next(self.parameters())
        cfg = self.config
        return KVCache.allocate(cfg.n_layers, batch, cfg.n_heads, max_len or cfg.length,
                                cfg.head_dim, p.device, compute_dtype(p.device, p.dtype))
