"""Profile one KV-cached decode step (method.md section 4): operator counts and ms per layer.

A decode step is dispatch-bound at small sizes, so the number of operators it dispatches,
not its arithmetic, sets its time. ``profile_step`` fills a KV cache to ``fill`` tokens,
then measures one step of the chosen family with ``torch.profiler`` (operators counted at
the top level of the dispatcher, i.e. as Python issues them, and in total) and with wall
clocks around every block (median ms per layer, after warm-up).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from esolm.config import ModelConfig
from esolm.device import synchronize
from esolm.model.attention import AttentionMask
from esolm.model.backbone import Backbone
from esolm.sampling.decode import sample_tokens


def random_weights(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Fill every parameter with N(0, std) draws (non-zero: zero-initialised adaLN and output
    layers would make every prediction uniform and every timing or equality trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(std).to(p))
    return model


def decode_step_fn(model: Backbone, family: str, fill: int) -> Callable[[], None]:
    """A closure running one cached decode step at cache length ``fill`` (and restoring it):
    Eso-LM (B) feeds the previous token (committed) and one mask; AR feeds one token."""
    B, L = 1, model.config.length
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (B, L), generator=gen).to(device)
    order = torch.randperm(L, generator=gen).expand(B, L).to(device)
    cache = model.new_cache(B)
    causal = AttentionMask("causal")
    with torch.inference_mode():
        model(tokens.gather(1, order[:, :fill]), order[:, :fill], causal, cache=cache, commit=fill)
    feed_n, commit = (2, 1) if family == "eso_b" else (1, 1)
    feed = order[:, fill - 1:fill - 1 + feed_n] if family == "eso_b" else order[:, fill:fill + 1]
    noise = torch.Generator(device=device).manual_seed(0)
    cache.length = fill - 1 if family == "eso_b" else fill

    # as the samplers do: the conditioning once per generation, under inference mode (older
    # versions of the backbone, profiled for comparison, had neither: no_grad, no cond)
    lean = hasattr(model, "conditioning")
    with torch.no_grad():
        extra = {"cond": model.conditioning()} if lean else {}
    mode = torch.inference_mode if lean else torch.no_grad

    def step() -> None:
        length = cache.length
        with mode():
            logits = model(tokens.gather(1, feed), feed, causal, cache=cache, commit=commit,
                           logits_for=slice(feed_n - 1, None), **extra)
            tokens.scatter_(1, feed[:, -1:], sample_tokens(logits, noise))
        cache.length = length

    return step


def count_ops(fn: Callable[[], None]) -> tuple[int, int]:
    """(top-level aten operators, all aten operators) dispatched by one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def top(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    return sum(1 for e in events if top(e)), len(events)


def time_layers(model: Backbone, fn: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median ms per step and per block over ``repeats`` calls after warm-up, by wall clock
    and by this thread's CPU time (on a shared CPU the latter ignores time spent descheduled).
    On a GPU every clock reading waits for the queued work first (``synchronize``), so the
    times are the device's, not the launch's; the waits themselves add a little per layer."""
    device = next(model.parameters()).device
    spans: dict[str, list[float]] = {"wall": [], "cpu": []}
    marks: dict[int, tuple[float, float]] = {}

    def pre(module: nn.Module, args: object) -> None:
        synchronize(device)
        marks[id(module)] = (time.perf_counter(), time.thread_time())

    def post(module: nn.Module, args: object, out: object) -> None:
        synchronize(device)
        w, c = marks[id(module)]
        spans["wall"].append(time.perf_counter() - w)
        spans["cpu"].append(time.thread_time() - c)

    for _ in range(max(3, repeats // 10)):
        fn()
    steps: dict[str, list[float]] = {"wall": [], "cpu": []}
    handles = [h for b in model.blocks for h in (b.register_forward_pre_hook(pre),
                                                 b.register_forward_hook(post))]
    try:
        for _ in range(repeats):
            synchronize(device)
            w, c = time.perf_counter(), time.thread_time()
            fn()
            synchronize(device)
            steps["wall"].append(time.perf_counter() - w)
            steps["cpu"].append(time.thread_time() - c)
    finally:
        for h in handles:
            h.remove()
    med = statistics.median
    return {"ms_per_step": 1e3 * med(steps["wall"]), "ms_per_layer": 1e3 * med(spans["wall"]),
            "cpu_ms_per_step": 1e3 * med(steps["cpu"]), "cpu_ms_per_layer": 1e3 * med(spans["cpu"])}


def profile_step(family: str = "eso_b", d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 vocab_size: int = 512, length: int = 1024, fill: int = 512,
                 repeats: int = 200, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict:
    """One cached decode step of ``family`` (eso_b or ar) at cache length ``fill`` on ``device``
    with weights in ``dtype``: operator counts per step and per layer (top-level), median ms per
    step and per layer (wall clock and thread CPU time, synchronised on GPUs)."""
    device = torch.device(device)
    if family not in ("eso_b", "ar"):
        raise ValueError(f"profile family {family!r} must be eso_b or ar")
    cfg = ModelConfig(family=family, vocab_size=vocab_size, length=length, n_layers=n_layers,
                      d_model=d_model, n_heads=n_heads, dropout=0.0,
                      **({"alpha_0": 1.0} if family == "eso_b" else {}))
    torch.manual_seed(0)

    def built(c: ModelConfig) -> Backbone:
        return random_weights(Backbone(c)).to(device=device, dtype=dtype).eval()

    model = built(cfg)
    fn = decode_step_fn(model, family, fill)
    fn()
    top, total = count_ops(fn)
    top1, _ = count_ops(decode_step_fn(built(cfg.replace(n_layers=1)), family, fill))
    top2, _ = count_ops(decode_step_fn(built(cfg.replace(n_layers=2)), family, fill))
    return {"family": family, "d_model": d_model, "n_layers": n_layers, "vocab_size": vocab_size,
            "length": length, "fill": fill, "ops_per_step": top, "ops_per_step_all": total,
            "ops_per_layer": top2 - top1, **time_layers(model, fn, repeats),
            "threads": torch.get_num_threads(), "device": str(device), "dtype": str(dtype)[6:]}
