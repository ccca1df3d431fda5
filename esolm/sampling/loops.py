"""One sampling loop per family (the ``sample`` of its record in ``esolm.families``), one
signature for all: ``loop(model, x, plan, dec, kv_cache, step_mode, n_given=0) -> NFE``.
Each takes the model, the initial tokens ``x`` [B, L] (mask id wherever a token is to be
generated), the family's plan (its schedule; AR has none), a ``Decoder``, whether to cache,
how cached steps run where the family has static steps (``graphs.STEP_MODES``) and the
number of given (prompt) tokens; it fills ``x`` in place and returns the forward passes run.
Attention masks come from the family's record (``model.config.family_record``).

Eso-LM (B): one KV cache for both phases; each step feeds only the previous step's tokens
(committed to the cache) and the masks decoded now (scratch), method.md section 4.
Eso-LM (A): the diffusion phase recomputes the clean tokens (bidirectional among them)
and feeds only the masks decoded this step; the sequential phase is cached.
With ``kv_cache=False`` both run a full forward over the permuted prefix every step:
the reference the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from esolm.model.backbone import Backbone
from esolm.model.cache import KVCache
from esolm.model.masks import AttentionMask, clean_mask
from esolm.ordering import Schedule
from esolm.sampling.decode import sample_tokens
from esolm.sampling.graphs import StaticSteps, steps_for

CAUSAL = AttentionMask("causal")  # Eso-LM (A)'s sequential phase: causal past its clean prefix


@dataclass
class Decoder:
    """Draws tokens from logits and writes them; records the logits when asked (tests)."""

    generator: torch.Generator
    top_p: float = 1.0
    record: bool = False
    logits: list[Tensor] = field(default_factory=list)
    on_step: Callable[[], None] | None = None

    def __call__(self, x: Tensor, positions: Tensor, logits: Tensor) -> None:
        """x [B, L] in place: x[b, positions[b, i]] = token drawn from logits[b, i]."""
        if self.record:
            self.logits.append(logits.detach().clone())
        x.scatter_(1, positions, sample_tokens(logits, self.generator, self.top_p))
        if self.on_step is not None:
            self.on_step()


def _cached(model: Backbone, batch: int, cond, kv_cache: bool,
            step_mode: str) -> tuple[KVCache | None, StaticSteps | None]:
    """(cache, static steps): none uncached; a fresh growing cache for dynamic steps; else the
    model's reused static steps (``graphs.steps_for``) and their cache."""
    if not kv_cache:
        return None, None
    static = steps_for(model, batch, cond, step_mode)
    return (model.new_cache(batch), None) if static is None else (static.cache, static)


def eso_b(model: Backbone, x: Tensor, sched: Schedule, dec: Decoder, kv_cache: bool,
          step_mode: str = "dynamic", n_given: int = 0) -> int:
    """step_mode: how cached steps run (``graphs.STEP_MODES``: static, compiled or CUDA graphs)."""
    mask = clean_mask(model.config)
    order = sched.order.to(x.device)
    cond = model.conditioning()
    cache, static = _cached(model, x.shape[0], cond, kv_cache, step_mode)
    start = prev = sched.n_given  # order[:start] is decoded; its last ``prev`` are not cached yet
    for k in sched.counts:
        cur = order[:, start:start + k]
        if static is not None:
            feed = order[:, start - prev:start + k]
            logits = static(x.gather(1, feed), feed, prev, prev)
        elif cache is not None:
            feed = order[:, start - prev:start + k]
            logits = model(x.gather(1, feed), feed, mask, cache=cache, commit=prev,
                           logits_for=slice(prev, None), cond=cond)
        else:
            feed = order[:, :start + k]
            logits = model(x.gather(1, feed), feed, mask, logits_for=slice(start, None), cond=cond)
        dec(x, cur, logits)
        start, prev = start + k, k
    return len(sched.counts)


def eso_a(model: Backbone, x: Tensor, sched: Schedule, dec: Decoder, kv_cache: bool,
          step_mode: str = "dynamic", n_given: int = 0) -> int:
    """The diffusion phase under the family's clean (prefix) mask; the sequential phase
    cached and causal once the clean tokens fill the cache."""
    cfg = model.config
    order = sched.order.to(x.device)
    B = x.shape[0]
    n_clean_end = sched.n_given + sched.n_diffusion  # clean tokens when the sequential phase starts
    cache = model.new_cache(B) if kv_cache else None
    cond = model.conditioning()
    start = sched.n_given
    for k in sched.counts:
        cur = order[:, start:start + k]
        n_clean = min(start, n_clean_end)
        if cache is not None and start > n_clean_end:  # cached sequential step
            feed = order[:, start - 1:start + 1]
            logits = model(x.gather(1, feed), feed, CAUSAL, cache=cache, commit=1,
                           logits_for=slice(1, None), cond=cond)
        else:  # diffusion step, the first sequential step (it fills the cache), or uncached
            feed = order[:, :start + k]
            mask = clean_mask(cfg, n_clean=torch.full((B,), n_clean, device=x.device))
            commit = start if cache is not None and start == n_clean_end else 0
            logits = model(x.gather(1, feed), feed, mask, cache=cache if commit else None,
                           commit=commit, logits_for=slice(start, None), cond=cond)
        dec(x, cur, logits)
        start += k
    return len(sched.counts)


def mdlm(model: Backbone, x: Tensor, sched: Schedule, dec: Decoder, kv_cache: bool,
         step_mode: str = "dynamic", n_given: int = 0) -> int:
    """Full recompute each step (no cache exists for bidirectional attention). Empty steps
    were dropped from the schedule, so every forward follows a change; logits are computed
    only for the positions decoded this step (no B x L x V tensors)."""
    order = sched.order.to(x.device)
    B, L = x.shape
    pos = torch.arange(L, device=x.device).expand(B, L)
    full = clean_mask(model.config)
    cond = model.conditioning()
    start = sched.n_given
    for k in sched.counts:
        cur = order[:, start:start + k]
        dec(x, cur, model(x, pos, full, logits_for=cur, cond=cond))
        start += k
    return len(sched.counts)


def bd3lm(model: Backbone, x: Tensor, blocks: list[Schedule], dec: Decoder, kv_cache: bool,
          step_mode: str = "dynamic", n_given: int = 0) -> int:
    """Blocks of L' left to right, MDLM inside the block (its own schedule), exact KV cache
    of earlier blocks; a finished block is committed by the next block's first forward."""
    B = x.shape[0]
    size = model.config.block_size
    mask = clean_mask(model.config)
    cache = model.new_cache(B) if kv_cache else None
    cond = model.conditioning()
    positions = torch.arange(model.config.length, device=x.device).expand(B, -1)
    nfe = 0
    for b, sched in enumerate(blocks):
        order = sched.order.to(x.device) + b * size
        start = sched.n_given
        for k in sched.counts:
            cur = order[:, start:start + k]
            first = cache.length if cache is not None else 0
            logits = model(x[:, first:(b + 1) * size], positions[:, first:(b + 1) * size], mask,
                           cache=cache, commit=b * size - first, logits_for=cur - first, cond=cond)
            dec(x, cur, logits)
            start += k
            nfe += 1
    return nfe


def ar(model: Backbone, x: Tensor, plan: None, dec: Decoder, kv_cache: bool,
       step_mode: str = "dynamic", n_given: int = 0) -> int:
    """Left to right with a standard KV cache; the input at position i is x_{i-1} (BOS = mask id).
    step_mode: how cached steps run (``graphs.STEP_MODES``: static, compiled or CUDA graphs)."""
    B, L = x.shape
    inp = torch.cat((torch.full((B, 1), model.config.mask_token_id, device=x.device), x[:, :-1]), 1)
    cond = model.conditioning()
    cache, static = _cached(model, B, cond, kv_cache, step_mode)
    mask = clean_mask(model.config)
    pos = torch.arange(L, device=x.device).expand(B, L)
    for i in range(n_given, L):
        first = cache.length if cache is not None else 0
        n = i + 1 - first
        if static is not None:
            logits = static(inp[:, first:i + 1], pos[:, first:i + 1], n, n - 1)
        else:
            logits = model(inp[:, first:i + 1], pos[:, first:i + 1], mask, cache=cache,
                           commit=n, logits_for=slice(-1, None), cond=cond)
        dec(x, pos[:, i:i + 1], logits)
        if i + 1 < L:
            inp[:, i + 1] = x[:, i]
    return L - n_given


LOOPS: dict[str, Callable[..., int]] = {"eso_b": eso_b, "eso_a": eso_a, "mdlm": mdlm, "bd3lm": bd3lm, "ar": ar}
"""The sampling loops by the family records' names (``Family.sample``)."""
