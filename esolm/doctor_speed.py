"""The timing parts of ``esolm doctor --full``: f (training throughput and MFU at GPT-2-small
size, the owt-small preset's model and micro-batch) and e (the sampling-speed table at the
paper's size through ``esolm.bench``). Both write a row as soon as it is measured and skip, with
their projection, the rows that cannot finish before the part's deadline."""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from esolm.device import is_accelerator, synchronize
from esolm.doctor_full import Ctx, Rows, failure
from esolm.io import write_text_atomic
from esolm.throughput import BenchRow

BF16_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
"""Dense BF16 tensor-core peaks by GPU name (SXM parts; a PCIe H100 peaks lower): MFU's denominator."""


def peak_flops(device: torch.device) -> float | None:
    if not is_accelerator(device):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------- f: training throughput
FAMILIES_F = [("eso_b", {"alpha_0": 0.25, "batch_split": 0.5}), ("ar", {}), ("mdlm", {})]


def part_f(ctx: Ctx) -> bool:
    from esolm.config import ModelConfig
    from esolm.training import TrainConfig

    gpu = is_accelerator(ctx.device) and not ctx.smoke
    if gpu:  # preset owt-small: 768d / 12 layers / 12 heads, L 1024, GPT-2 vocabulary, micro batch 32
        size = dict(vocab_size=50257, length=1024, d_model=768, n_layers=12, n_heads=12, cond_dim=128)
        tcs = dict(steps=20, batch_size=64, micro_batch_size=32, precision="bf16-mixed", accelerator="gpu")
    else:
        size = dict(vocab_size=257, length=64, d_model=64, n_layers=2, n_heads=4, cond_dim=32)
        tcs = dict(steps=6, batch_size=8, micro_batch_size=4, precision="32-true", accelerator="cpu")
    rows = Rows(ctx.out / "f_train.json")
    last = 0.0
    for family, kw in FAMILIES_F:
        row = {"family": family, **kw, **tcs, **size}
        if ctx.left() < max(10.0, 1.3 * last):
            rows.add({**row, "ok": None, "skipped": f"no time left (the previous family took {last:.0f}s)"})
            continue
        t0 = time.time()
        try:
            cfg = ModelConfig(family=family, dropout=0.1, **size, **kw)
            tc = TrainConfig(lr=3e-4, warmup_steps=100, ema=0.9999, val_every=10**6, ckpt_every=10**6,
                             log_every=10**6, **tcs)
            row.update(train_rate(cfg, tc, ctx.device))
        except Exception as err:  # recorded in the row
            row.update(failure(err))
        last = time.time() - t0
        rows.add(row)
        gc.collect()
        if is_accelerator(ctx.device):
            torch.cuda.empty_cache()
    return rows.ok


def train_rate(cfg, tc, device: torch.device) -> dict:
    """tokens/s of ``tc.steps`` Lightning optimizer steps on random tokens (steps after the
    first third: allocator and kernel warm-up excluded), peak memory, FLOPs per token of one
    micro-batch forward + backward (counted by torch) and the MFU they give."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from esolm.data.batches import Batches
    from esolm.training import LitModel, MicroBatches, lightning_notices, trainer_for

    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if (args[-1] + 1) % tc.accumulate == 0:  # the batch that ends an optimizer step
                synchronize(device)
                stamps.append(time.perf_counter())

    dtype = np.uint16 if cfg.vocab_size < 2**16 else np.uint32
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (tc.batch_size * (tc.steps + 1), cfg.length))
    module = LitModel(cfg, tc)
    module.train_data = MicroBatches(Batches(data.astype(dtype), batch_size=tc.micro, seed=0))
    if is_accelerator(device):
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="esolm-doctor-f-") as run, lightning_notices(False):
        trainer = trainer_for(tc, Path(run), progress=False, callbacks=[Stamp()])
        t0 = time.perf_counter()
        trainer.fit(module, DataLoader(module.train_data, batch_size=None))
        fit_s = time.perf_counter() - t0
    skip = max(1, len(stamps) // 3)
    steps, secs = len(stamps) - 1 - skip, stamps[-1] - stamps[skip]
    tokens_per_s = steps * tc.batch_size * cfg.length / secs
    flops = _flops_per_token(module.model.to(device).train(), cfg, tc, data[: tc.micro], device)
    peak = peak_flops(device)
    losses = [float(x) for x in module.losses] or [float("nan")]
    return {"fit_s": fit_s, "timed_steps": steps, "tokens_per_s": tokens_per_s, "s_per_step": secs / steps,
            "flops_per_token": flops, "peak_flops": peak,
            "mfu": tokens_per_s * flops / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if is_accelerator(device) else None,
            "last_loss": losses[-1], "ok": steps > 0 and math.isfinite(losses[-1])}


def _flops_per_token(net, cfg, tc, rows: np.ndarray, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from esolm.objectives import loss

    x = torch.from_numpy(rows.astype(np.int64)).to(device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16-mixed"):
            out = loss(net, x, generator=torch.Generator().manual_seed(0))
        out.per_token.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.numel()


# --------------------------------------------------------------------------- e: sampling speed
def bench_row(bc, family: str, length: int, batch: int, device: torch.device) -> BenchRow:
    """One family at one length and batch, NFE = L, timed by ``esolm.bench`` (the one call to
    adapt when the bench's API changes)."""
    from esolm.bench import time_cell

    return time_cell(bc, (family,), length, "L", device, batch=batch)[0]


def bench_config(ctx: Ctx):
    """The paper-gpu preset on a GPU (cached steps as CUDA graphs, MDLM timed over a few steps);
    a tiny backbone with --smoke or on a CPU."""
    from esolm.bench import BenchConfig

    if is_accelerator(ctx.device) and not ctx.smoke:
        return BenchConfig(suite="paper-gpu").resolved()
    return BenchConfig(variants=("eso_b", "mdlm", "bd3lm_l4", "ar"), lengths=(32, 64), batch_sizes=(1, 2),
                       d_model=32, n_layers=2, n_heads=4, vocab_size=101, dtype="float32", repeats=2,
                       warmup=1, mdlm_max_steps=8)


def plan(bc) -> list[tuple[str, int, int]]:
    """(family, length, batch) in the order they run: batch 1 before the paper's batches; within
    a batch, the families whose steps replay CUDA graphs (Eso-LM (B), AR) and MDLM (few timed
    steps) at every length before the rest (BD3-LM's dynamic steps are slow)."""
    rank = {"eso_b": 0, "ar": 1, "mdlm": 2}
    fams = sorted(bc.variants, key=lambda f: rank.get(f, 3))
    batches = {L: bc.batches(L) for L in bc.lengths}
    out = []
    for i in range(max(len(b) for b in batches.values())):
        for group in ([f for f in fams if f in rank], [f for f in fams if f not in rank]):
            out += [(f, L, batches[L][i]) for L in bc.lengths if i < len(batches[L]) for f in group]
    return out


def projected_run_s(bc, family: str, length: int, batch: int, done: list[BenchRow]) -> float | None:
    """Seconds one timed run should take, from this family's nearest smaller measured row: its
    time per step scaled by sqrt(L x batch) (decode steps at these sizes are bound by the host
    and by memory, not by arithmetic: an optimistic guess, used only to skip rows that cannot
    finish), times the steps timed (MDLM: ``mdlm_max_steps``); None before a first measurement."""
    from esolm.bench import VARIANTS
    from esolm.families import family as spec_of

    seen = [r for r in done if r.variant == family and r.median_s]
    if not seen:
        return None
    ref = max(seen, key=lambda r: (r.length * r.batch_size <= length * batch, r.length * r.batch_size))
    step_s = ref.median_s / ref.nfe * max(1.0, length * batch / (ref.length * ref.batch_size)) ** 0.5
    scaled = not spec_of(VARIANTS[family][0]).kv_cache and 0 < bc.mdlm_max_steps < length
    return step_s * (bc.mdlm_max_steps if scaled else length)


def part_e(ctx: Ctx) -> bool:
    from esolm.bench import format_rows

    bc = bench_config(ctx)
    rows = Rows(ctx.out / "e_bench.jsonl")  # the bench's rows, with the part's keys (ok, projected_s, ...)
    timed: list[BenchRow] = []
    for family, length, batch in plan(bc):
        proj = projected_run_s(bc, family, length, batch, timed)
        head = {"variant": family, "length": length, "batch_size": batch, "nfe_budget": "L"}
        if proj is not None and proj + 5 > ctx.left():
            rows.add({**head, "ok": None, "projected_s": proj, "skipped": "projected time exceeds the time left"})
            continue
        repeats = bc.repeats if proj is not None and proj * bc.repeats + 5 < 0.2 * ctx.left() else 1
        row = {**head, "projected_s": proj}
        try:
            timed.append(bench_row(replace(bc, repeats=repeats), family, length, batch, ctx.device))
            row.update(timed[-1].to_json(), ok=True)
        except torch.OutOfMemoryError as err:  # the machine's limit, not a fault: recorded, not failed
            row.update(ok=None, error=f"out of memory: {str(err).splitlines()[0][:200]}")
        except Exception as err:  # recorded in the row
            row.update(failure(err))
        rows.add(row)
        gc.collect()
        if is_accelerator(ctx.device):
            torch.cuda.empty_cache()
    table = "\n".join([format_rows(timed) if timed else "no row was timed", *speedups(timed)])
    write_text_atomic(ctx.out / "e_table.txt", table + "\n")
    print(table)
    return rows.ok


def speedups(rows: list[BenchRow]) -> list[str]:
    """Eso-LM (B)'s speedup over every other family timed at the same length and batch."""
    out = []
    for length, batch in sorted({(r.length, r.batch_size) for r in rows}):
        cell = {r.variant: r.median_s for r in rows if (r.length, r.batch_size) == (length, batch)}
        if "eso_b" in cell and len(cell) > 1:
            ratios = ", ".join(f"{f} {s / cell['eso_b']:.2f}x" for f, s in cell.items() if f != "eso_b")
            out.append(f"L={length} batch={batch}: eso_b {cell['eso_b']:.3f}s; speedup over {ratios}")
    return out
