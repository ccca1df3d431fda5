"""Cached decode steps over a static KV cache: eager, compiled, or replayed as CUDA graphs.

A static cache (``KVCache.make_static``) keeps every shape of a decode step fixed: the step
writes its K/V at device-side slots and attends over the whole buffer under a mask computed
on the device, so it never reads a position back to the host. On CUDA each distinct step
shape is captured once as a CUDA graph and replayed with its inputs copied into static
buffers; elsewhere, or with graphs off, the same static step runs eagerly: that eager step is
the reference the graphs are tested against (tests/test_sampling_graphs.py). With ``compile``
the same static step runs through ``torch.compile`` (inductor; CPU or GPU), compiled once per
step shape.

``steps_for`` keeps one ``StaticSteps`` per (model, batch, dtype, mode, device) and reuses it
across ``generate`` calls (its cache is rewound, its conditioning refreshed in place), so graphs
are captured and steps compiled once per process, not once per call. With CUDA graphs the
number of tokens a step feeds is bucketed to a power of two (``BUCKET``): the extra tokens repeat
the last one, sit in scratch slots after the real ones (no real token sees them), are never
committed and their logits are dropped; the tokens committed are a device-side input. A
log-linear schedule then captures a handful of graphs instead of one per distinct step size,
and all graphs share one memory pool.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from esolm.config import STEP_MODES
from esolm.device import is_accelerator
from esolm.model.attention import AttentionMask
from esolm.model.backbone import Backbone, Conditioning, compute_dtype
from esolm.model.cache import KVCache

CAUSAL = AttentionMask("causal")


BUCKET: bool | None = None
"""Whether step sizes are bucketed to powers of two (padded, the padding dropped). None: exactly
when steps replay as CUDA graphs (where each distinct shape costs a capture); tests set True to
check the padded steps on CPU."""

MAX_PER_MODEL = 4  # StaticSteps kept per model (each holds a KV cache); the oldest is dropped


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
    logits [B, N - logits_from, V] are returned (on CUDA graphs: a view of a static buffer that
    the next step overwrites, so use it before the next call)."""

    def __init__(self, model: Backbone, cache: KVCache, cond: Conditioning, mode: str = "static",
                 bucket: bool | None = None) -> None:
        self.model, self.cache, self.cond = model, cache.make_static(), cond
        self.graphs = check_step_mode(mode) == "cuda_graphs" and is_accelerator(cache.k.device)
        default = self.graphs if BUCKET is None else BUCKET
        self.bucket = default if bucket is None else bucket
        self.commit_buf = torch.zeros((), dtype=torch.long, device=cache.k.device)  # bucketed steps
        self.captured: dict[tuple, _Captured] = {}
        self.step = self._eager
        if mode == "compile":
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self.step = torch.compile(self._eager, dynamic=False)

    def reset(self, cond: Conditioning) -> StaticSteps:
        """Rewind the cache to empty for a new generation and take ``cond``'s values into the
        conditioning tensors the steps (and their captured graphs) read. Stale keys and values
        stay in the buffer unseen: every step writes its slots before any query can see them."""
        self.cache.length = 0
        self.cache.pos.zero_()
        if cond is not self.cond:
            for mine, new in zip(_flat(self.cond), _flat(cond), strict=True):
                mine.copy_(new)
        return self

    def _eager(self, tokens: Tensor, positions: Tensor, commit: int | Tensor, logits_from: int) -> Tensor:
        return self.model(tokens, positions, CAUSAL, cache=self.cache, commit=commit,
                          logits_for=slice(logits_from, None), cond=self.cond)

    def __call__(self, tokens: Tensor, positions: Tensor, commit: int, logits_from: int) -> Tensor:
        n = tokens.shape[1]
        self.cache.check_room(n)
        if self.bucket:
            room = self.cache.capacity - self.cache.length
            n_pad = max(n, min(1 << (n - 1).bit_length(), room))
            if n_pad > n:  # repeat the last token: scratch slots after the real ones
                tokens = torch.cat((tokens, tokens[:, -1:].expand(-1, n_pad - n)), 1)
                positions = torch.cat((positions, positions[:, -1:].expand(-1, n_pad - n)), 1)
            self.commit_buf.fill_(commit)
            step_commit: int | Tensor = self.commit_buf
            step_from = 0  # logits of every fed token; the caller's are sliced out below
        else:
            step_commit, step_from = commit, logits_from
        if self.graphs:
            key = (tuple(tokens.shape),) if self.bucket else (tuple(tokens.shape), commit, logits_from)
            entry = self.captured.get(key) or self._capture(key, tokens, positions, step_commit, step_from)
            entry.tokens.copy_(tokens)
            entry.positions.copy_(positions)
            entry.graph.replay()
            out = entry.out
        else:
            out = self.step(tokens, positions, step_commit, step_from)
        self.cache.length += commit
        return out[:, logits_from:n] if self.bucket else out

    def _capture(self, key: tuple, tokens: Tensor, positions: Tensor, commit: int | Tensor,
                 logits_from: int) -> _Captured:
        """Warm up on a side stream of the cache's device, capture into the shared pool, and
        restore the cache position (the warm-up writes only uncommitted scratch slots, which
        every step rewrites before reading)."""
        cache, device = self.cache, self.cache.k.device
        pos, length = cache.pos.clone(), cache.length
        static_tokens, static_positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._eager(static_tokens, static_positions, commit, logits_from)
                cache.pos.copy_(pos)
                cache.length = length
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=_pool(device)):
            out = self._eager(static_tokens, static_positions, commit, logits_from)
        cache.pos.copy_(pos)
        cache.length = length
        entry = _Captured(graph, static_tokens, static_positions, out)
        self.captured[key] = entry
        return entry


def _flat(cond: Conditioning) -> list[Tensor]:
    mods, out = cond
    return [t for m in mods for t in m] + list(out)


_POOLS: dict[torch.device, object] = {}


def _pool(device: torch.device):
    """One CUDA-graph memory pool per device, shared by every captured step: a step's output is
    used before the next replay, so graphs never need each other's memory at the same time."""
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


_REGISTRY: weakref.WeakKeyDictionary[Backbone, dict[tuple, StaticSteps]] = weakref.WeakKeyDictionary()


def steps_for(model: Backbone, batch: int, cond: Conditioning, mode: str) -> StaticSteps | None:
    """The ``StaticSteps`` of ``model`` for ``batch`` rows in ``mode``, made once and reused by
    later generations (rewound, with ``cond`` refreshed); None for dynamic steps. Keyed by the
    weights' storage too, so a model moved or cast to new tensors gets new steps."""
    if check_step_mode(mode) == "dynamic":
        return None
    p = model.head.weight
    key = (batch, mode, BUCKET, p.device, compute_dtype(p.device, p.dtype), p.data_ptr(), model.embed.weight.data_ptr())
    mine = _REGISTRY.setdefault(model, {})
    steps = mine.pop(key, None)
    if steps is None:
        while len(mine) >= MAX_PER_MODEL:
            mine.pop(next(iter(mine)))
        steps = StaticSteps(model, model.new_cache(batch), cond, mode)
    mine[key] = steps  # most recently used last
    return steps.reset(cond)
