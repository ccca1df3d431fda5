"""Cached decode steps over a static KV cache: eager, compiled, or replayed as CUDA graphs.

A static cache (``KVCache.make_static``) keeps every shape of a decode step fixed: the step
writes its K/V at device-side slots and attends over the whole buffer under a mask computed
on the device, so it never reads a position back to the host. On CUDA each distinct step
shape (tokens fed, tokens committed, first token with logits) is captured once as a CUDA
graph and replayed with its inputs copied into static buffers; elsewhere, or with graphs
off, the same static step runs eagerly: that eager step is the reference the graphs are
tested against (tests/test_sampling_graphs.py). With ``compile`` the same static step runs
through ``torch.compile`` (inductor; CPU or GPU), compiled once per step shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from esolm.device import is_accelerator
from esolm.model.attention import MaskSpec
from esolm.model.backbone import Backbone, Conditioning
from esolm.model.cache import KVCache

CAUSAL = MaskSpec("causal")

STEP_MODES = ("dynamic", "static", "compile", "cuda_graphs")
"""How cached decode steps run. dynamic: the cache grows step by step (the reference path);
static: a fixed-size cache, every step of one shape runs the same kernels; compile: the static
step through ``torch.compile`` (one compilation per step shape: tokens fed, committed, with
logits); cuda_graphs: the static step captured once per shape as a CUDA graph on a GPU
(elsewhere it runs as static)."""


def check_step_mode(mode: str) -> str:
    if mode not in STEP_MODES:
        raise ValueError(f"step mode {mode!r} is unknown; use one of {STEP_MODES}")
    return mode


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    tokens: Tensor
    positions: Tensor
    out: Tensor


class StaticSteps:
    """``step(tokens, positions, commit, logits_from) -> logits`` over one static cache.

    tokens, positions: LongTensor[B, N]; the first ``commit`` tokens are kept in the cache;
    logits [B, N - logits_from, V] are returned (on CUDA graphs: a static buffer that the
    next step overwrites, so use it before the next call)."""

    def __init__(self, model: Backbone, cache: KVCache, cond: Conditioning, mode: str = "static") -> None:
        self.model, self.cache, self.cond = model, cache.make_static(), cond
        self.graphs = check_step_mode(mode) == "cuda_graphs" and is_accelerator(cache.k.device)
        self.captured: dict[tuple, _Captured] = {}
        self.step = self._eager
        if mode == "compile":
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.step = torch.compile(self._eager, dynamic=False)

    def _eager(self, tokens: Tensor, positions: Tensor, commit: int, logits_from: int) -> Tensor:
        return self.model(tokens, positions, CAUSAL, cache=self.cache, commit=commit,
                          logits_for=slice(logits_from, None), cond=self.cond)

    def __call__(self, tokens: Tensor, positions: Tensor, commit: int, logits_from: int) -> Tensor:
        self.cache.check_room(tokens.shape[1])
        if not self.graphs:
            out = self.step(tokens, positions, commit, logits_from)
            self.cache.length += commit
            return out
        key = (tuple(tokens.shape), commit, logits_from)
        entry = self.captured.get(key) or self._capture(key, tokens, positions, commit, logits_from)
        entry.tokens.copy_(tokens)
        entry.positions.copy_(positions)
        entry.graph.replay()
        self.cache.length += commit
        return entry.out

    def _capture(self, key: tuple, tokens: Tensor, positions: Tensor, commit: int,
                 logits_from: int) -> _Captured:
        """Warm up on a side stream, capture, and restore the cache position (the warm-up
        writes only uncommitted scratch slots, which every step rewrites before reading)."""
        cache = self.cache
        pos, length = cache.pos.clone(), cache.length
        static_tokens, static_positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._eager(static_tokens, static_positions, commit, logits_from)
                cache.pos.copy_(pos)
                cache.length = length
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(static_tokens, static_positions, commit, logits_from)
        cache.pos.copy_(pos)
        cache.length = length
        entry = _Captured(graph, static_tokens, static_positions, out)
        self.captured[key] = entry
        return entry
