"""Cached decode steps over a static KV cache, replayed as CUDA graphs on a GPU.

A static cache (``KVCache.make_static``) keeps every shape of a decode step fixed: the step
writes its K/V at device-side slots and attends over the whole buffer under a mask computed
on the device, so it never reads a position back to the host. On CUDA each distinct step
shape (tokens fed, tokens committed, first token with logits) is captured once as a CUDA
graph and replayed with its inputs copied into static buffers; elsewhere, or with graphs
off, the same static step runs eagerly: that eager step is the reference the graphs are
tested against (tests/test_sampling_graphs.py).
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

    def __init__(self, model: Backbone, cache: KVCache, cond: Conditioning, graphs: bool) -> None:
        self.model, self.cache, self.cond = model, cache.make_static(), cond
        self.graphs = graphs and is_accelerator(cache.k.device)
        self.captured: dict[tuple, _Captured] = {}

    def _eager(self, tokens: Tensor, positions: Tensor, commit: int, logits_from: int) -> Tensor:
        return self.model(tokens, positions, CAUSAL, cache=self.cache, commit=commit,
                          logits_for=slice(logits_from, None), cond=self.cond)

    def __call__(self, tokens: Tensor, positions: Tensor, commit: int, logits_from: int) -> Tensor:
        if not self.graphs:
            return self._eager(tokens, positions, commit, logits_from)
        key = (tuple(tokens.shape), commit, logits_from)
        entry = self.captured.get(key) or self._capture(key, tokens, positions, commit, logits_from)
        self.cache.check_room(tokens.shape[1])
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
