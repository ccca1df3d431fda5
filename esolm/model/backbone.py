"""The one backbone: a DiT-style transformer with rotary positions that follow a permutation.

Pre-LayerNorm blocks with adaLN modulation from a time embedding (Eso-LMs are time
invariant and feed t = 0), GELU MLP, untied input/output embeddings, dropout
(method.md section 3). Every family uses this module; they differ only in the tokens,
positions and ``MaskSpec`` they feed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esolm.config import ModelConfig
from esolm.model.attention import MaskSpec, attention, prebuild
from esolm.model.cache import KVCache


class Rotary(nn.Module):
    """Rotary embedding evaluated at arbitrary (permuted) integer positions."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, N] -> (cos, sin), each [B, 1, N, head_dim / 2]."""
        angles = positions.unsqueeze(-1).to(self.inv_freq.dtype) * self.inv_freq
        return angles.cos().unsqueeze(1).to(dtype), angles.sin().unsqueeze(1).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) = (first half, second half) of the head dimension. x: [B, H, N, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


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

    def forward(self, h: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor], spec: MaskSpec,
                cache: tuple[Tensor, Tensor, int, int] | None) -> Tensor:
        """h: [B, N, d]; mod: adaLN modulation [B or 1, 6d] (``self.modulation`` of the
        conditioning, computed by the backbone); cache: (k_buf, v_buf, start, commit) or None."""
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, dim=-1)
        x = self.norm1(h) * (1 + scale1) + shift1
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k_buf, v_buf, start, _ = cache
            k_buf[:, :, start:start + N] = k
            v_buf[:, :, start:start + N] = v
            k, v = k_buf[:, :, :start + N], v_buf[:, :, :start + N]
        a = attention(q, k, v, spec, self.backend).transpose(1, 2).reshape(B, N, d)
        h = h + gate1 * self.drop(self.proj(a))
        x = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * self.drop(self.mlp(x))


class Backbone(nn.Module):
    """``model(tokens, positions, spec) -> logits`` for every family.

    tokens, positions: LongTensor[B, N] (positions are original positions, so a permuted
    input carries permuted rotary phases); spec: the attention mask over these N tokens.
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
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model, bias=False)
        self.modulation_out = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_embed)
        self._frozen_mods: list[Tensor] | None = None  # set only inside inference()
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """The training initialisation of the reference (method.md section 7): Normal(0, std)
        weights and zero biases, then adaLN-Zero: every adaLN modulation (of the blocks and of
        the output layer) and the output layer itself start at zero, so every block starts as
        the identity and every prediction is uniform at step 0. Tests that check equalities
        must randomise all weights themselves: on this init they would hold trivially."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in (*(b.modulation for b in self.blocks), self.modulation_out, self.head):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, positions: Tensor, spec: MaskSpec, t: Tensor | None = None,
                cache: KVCache | None = None, commit: int = 0,
                logits_for: slice | Tensor = slice(None)) -> Tensor:
        mods = self._constant_modulations(tokens.device) if t is None else self._modulations(t)
        h = self.embed(tokens)  # no dropout on the token embedding (as the reference)
        rope = self.rotary(positions, h.dtype)
        start = 0
        if cache is not None:
            start = cache.length
            cache.check_room(tokens.shape[1])
            spec = replace(spec, q_offset=start)
        n = tokens.shape[1]
        spec = prebuild(spec, tokens.shape[0], n, start + n, tokens.device, self.config.attn_backend)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], start, commit)
            h = block(h, mods[i], rope, spec, layer_cache)
        if cache is not None:
            cache.length = start + commit
        if isinstance(logits_for, Tensor):  # LongTensor[B, k] of token indices
            h = h.gather(1, logits_for.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        else:
            h = h[:, logits_for]
        shift, scale = mods[-1][:, None].chunk(2, dim=-1)
        logits = self.head(self.norm_out(h) * (1 + scale) + shift).float()
        logits[..., self.config.mask_token_id] = float("-inf")
        return logits

    def _modulations(self, t: Tensor) -> list[Tensor]:
        """adaLN modulations of every block, then of the output layer, for times t [B or 1]."""
        c = F.silu(self.time(t))
        return [block.modulation(c) for block in self.blocks] + [self.modulation_out(c)]

    def _constant_modulations(self, device: torch.device) -> list[Tensor]:
        """The t = 0 modulations (time-invariant models), one row broadcast over the batch:
        the ones frozen by ``inference()`` when inside it, else computed now."""
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
        """A static KV cache for ``batch`` rows and ``max_len`` tokens (default: the model length)."""
        p = next(self.parameters())
        cfg = self.config
        return KVCache.allocate(cfg.n_layers, batch, cfg.n_heads, max_len or cfg.length,
                                cfg.head_dim, p.device, p.dtype)
