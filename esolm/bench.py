"""Side-by-side sampling speed of every family on the same backbone (method.md section 6).

Every family samples ``batch_size`` sequences of length L with the same backbone size and
random weights (speed does not depend on the weights). ``nfe="L"`` decodes one token per
forward pass (the paper's setting); an integer NFE budget spreads L tokens over that many
steps (AR always takes L). Each cell (length, NFE budget, batch size) is the median wall time
over ``repeats`` runs after ``warmup`` short runs of the timed configuration (its first
``WARMUP_STEPS`` forward passes: the same step shapes as the timed run, so that lazy set-up,
compilation and CUDA-graph captures land there and not in the timed runs), with the repeats of
all families interleaved, and ratios are computed from medians measured in the same process.
Next to time, each row gives the KV-cache bytes and the peak memory of the runs, and every
setting; a cell's rows are handed to ``on_cell`` as soon as the cell is timed, so a run cut
short keeps every finished cell. ``step_mode: auto`` replays cached steps as CUDA graphs on a
GPU (host-bound dynamic steps took ~10 ms each on an H200 at the paper's size, graphs ~1 ms:
reports/gpu/) and runs them dynamically on a CPU (faster there than static steps).

MDLM runs the same full forward at every step, so with ``mdlm_max_steps`` > 0 it is timed
over that many steps (each decoding L / mdlm_max_steps tokens) and scaled linearly to the
requested NFE; such rows carry ``extrapolated_from_nfe``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Self

import torch
from tqdm.auto import tqdm

from esolm.config import ModelConfig, ScheduleSettings
from esolm.device import is_accelerator, synchronize
from esolm.model.backbone import Backbone
from esolm.profiling import random_weights
from esolm.sampling import generate
from esolm.sampling.graphs import check_step_mode
from esolm.throughput import BenchRow

VARIANTS: dict[str, tuple[str, dict]] = {
    "eso_b": ("eso_b", {"alpha_0": 1.0}),
    "eso_a": ("eso_a", {"alpha_0": 1.0}),
    "mdlm": ("mdlm", {}),
    "bd3lm_l4": ("bd3lm", {"block_size": 4}),
    "bd3lm_l16": ("bd3lm", {"block_size": 16}),
    "ar": ("ar", {}),
}
"""The bench's variants: name -> (family, settings). A row of the bench (``throughput.BenchRow``) is one
variant timed at one length, NFE budget and batch size; its ``speedup_vs`` compares the variants of one cell."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WARMUP_STEPS = 16

PAPER_BATCH = {2048: 256, 8192: 64}
"""The authors' throughput batches per sequence length (``batch_sizes`` entry "paper")."""

# bench suites, named sets of settings: ``esolm bench --set bench.suite=paper-gpu`` (one command on a GPU)
SUITES: dict[str, dict] = {
    "": {},
    # the paper's Table 3: L in {2048, 8192}, NFE = L, 768d / 12 layers, GPT-2 vocabulary, at
    # batch 1 and at the authors' batches; MDLM (a full forward per step) timed over a few steps
    # and scaled. Sized for about 6 minutes on one H100/H200 (not yet run on one: see reports/gpu).
    "paper-gpu": dict(variants=("eso_b", "mdlm", "bd3lm_l4", "ar"), lengths=(2048, 8192),
                      batch_sizes=(1, "paper"), d_model=768, n_layers=12, n_heads=12, vocab_size=50257,
                      dtype="bfloat16", repeats=2, warmup=1, mdlm_max_steps=16, step_mode="auto"),
}


@dataclass(frozen=True)
class BenchConfig:
    """Defaults: the d = 128 / 4-layer / V = 512 backbone (large enough that a decode step is
    not pure dispatch, small enough for CPU). threads: CPU threads (0: torch's default).
    dtype: weights and activations (logits and Gumbel noise stay float32 / float64).
    step_mode: how the cached decode steps of Eso-LM (B) and AR run (``graphs.STEP_MODES``:
    dynamic, static, compile, cuda_graphs); every family of one run uses the same mode."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    """The bench variants timed (``VARIANTS``: eso_b and eso_a at alpha_0 = 1, mdlm, bd3lm_l4, bd3lm_l16, ar)."""
    lengths: tuple[int, ...] = (256, 1024)
    nfe: tuple[str | int, ...] = ("L",)
    batch_size: int = 1
    batch_sizes: tuple[int | str, ...] = ()
    """Batch sizes of the cells (each one a cell per length); "paper": the authors' batch at that
    length (``PAPER_BATCH``). Empty: ``batch_size`` alone."""
    repeats: int = 3
    warmup: int = 1
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 512
    dtype: str = "float32"
    threads: int = 0
    mdlm_max_steps: int = 0
    step_mode: str = "auto"
    seed: int = 0
    suite: str = ""

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"bench.variants has unknown entries {unknown}; use any of {tuple(VARIANTS)}")
        if self.repeats < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError("bench.repeats and bench.batch_size must be >= 1, bench.warmup >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench.dtype={self.dtype!r} is unknown; use one of {tuple(DTYPES)}")
        if self.suite not in SUITES:
            raise ValueError(f"bench.suite={self.suite!r} is unknown; use one of {tuple(SUITES)}")
        if self.step_mode != "auto":
            check_step_mode(self.step_mode)
        bad = [b for b in self.batch_sizes if b != "paper" and not (isinstance(b, int) and b >= 1)]
        if bad:
            raise ValueError(f"bench.batch_sizes has invalid entries {bad}; use integers >= 1 or 'paper'")
        if self.threads < 0 or self.mdlm_max_steps < 0:
            raise ValueError("bench.threads and bench.mdlm_max_steps must be >= 0")

    def resolved(self) -> BenchConfig:
        """This config with its suite's settings applied (the suite wins)."""
        return replace(self, **SUITES[self.suite], suite="") if self.suite else self

    def batches(self, length: int) -> list[int]:
        """The batch sizes timed at ``length``."""
        out = []
        for b in self.batch_sizes or (self.batch_size,):
            if b == "paper" and length not in PAPER_BATCH:
                raise ValueError(f"bench.batch_sizes 'paper' has no batch for L={length}; the authors "
                                 f"timed L in {sorted(PAPER_BATCH)}: give an integer")
            b = PAPER_BATCH[length] if b == "paper" else b
            if b not in out:
                out.append(b)
        return out

    def mode(self, device: torch.device) -> str:
        """The step mode run on ``device``: auto is cuda_graphs on a GPU, dynamic elsewhere."""
        if self.step_mode != "auto":
            return self.step_mode
        return "cuda_graphs" if is_accelerator(device) else "dynamic"


def _model(bc: BenchConfig, variant: str, length: int, device: torch.device) -> Backbone:
    name, extra = VARIANTS[variant]
    cfg = ModelConfig(family=name, vocab_size=bc.vocab_size, length=length, n_layers=bc.n_layers,
                      d_model=bc.d_model, n_heads=bc.n_heads, dropout=0.0, **extra)
    torch.manual_seed(bc.seed)
    model = random_weights(Backbone(cfg), seed=bc.seed)
    return model.to(device=device, dtype=DTYPES[bc.dtype]).eval()


def _steps(model: Backbone, length: int, nfe: str | int) -> int:
    """Diffusion steps that give the requested NFE (per block for BD3-LM)."""
    budget = length if nfe == "L" else int(nfe)
    if model.config.family_record.blocks:
        return max(1, budget * model.config.block_size // length)
    return max(1, budget)


def kv_cache_bytes(model: Backbone, batch: int) -> int:
    """Bytes of the static KV cache the family's sampler allocates (0 for MDLM: no cache)."""
    if not model.config.family_record.kv_cache:
        return 0
    c = model.config
    item = next(model.parameters()).element_size()
    return 2 * c.n_layers * batch * c.length * c.d_model * item


class PeakMemory:
    """Peak memory over a region: CUDA max_memory_allocated, or on CPU the growth of the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs; None where unsupported)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ("cuda max_memory_allocated (weights included)" if is_accelerator(device)
                     else "cpu peak RSS growth of the process (VmHWM)")

    def __enter__(self) -> Self:
        self.peak: int | None = None
        if is_accelerator(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = _rss("VmRSS") if _reset_hwm() else None
        return self

    def __exit__(self, *exc: object) -> None:
        if is_accelerator(self.device):
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            hwm = _rss("VmHWM")
            self.peak = None if hwm is None else max(0, hwm - self.base)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _settings(bc: BenchConfig, steps: int, seed: int, device: torch.device) -> ScheduleSettings:
    """The sampling settings of every timed run: the power schedule (even counts: NFE = steps)."""
    return ScheduleSettings(steps=steps, schedule="power", seed=seed, step_mode=bc.mode(device))


def _setup(bc: BenchConfig, variant: str, length: int, nfe: str | int, batch: int,
           device: torch.device) -> tuple[Backbone, int, float]:
    """(model, steps to run, scale to the requested NFE), warmed up on the timed shapes."""
    model = _model(bc, variant, length, device)
    steps = _steps(model, length, nfe)
    scale = 1.0
    if not model.config.family_record.kv_cache and 0 < bc.mdlm_max_steps < steps:  # a full forward every step
        scale, steps = steps / bc.mdlm_max_steps, bc.mdlm_max_steps
    for i in range(bc.warmup):
        generate(model, _settings(bc, steps, bc.seed + 1000 + i, device), num_samples=batch,
                 stop_after=WARMUP_STEPS)
    return model, steps, scale


def time_cell(bc: BenchConfig, variants: tuple[str, ...], length: int, nfe: str | int,
              device: torch.device, batch: int | None = None) -> list[BenchRow]:
    """Median sampling time of each variant at one length, NFE budget and batch, with memory,
    and the ratios of every other variant's median over each one's (``BenchRow.speedup_vs``).

    The repeats are interleaved (repeat r of every variant, then r + 1), so that a change in
    the machine's load during the run hits every variant alike. Besides wall time, each row
    has the median process CPU time (less sensitive to other processes on a shared CPU)."""
    batch = batch or bc.batch_size
    bc = replace(bc, batch_size=batch)
    setups = {v: _setup(bc, v, length, nfe, batch, device) for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    nfes: dict[str, list[int]] = {v: [] for v in variants}
    peaks: dict[str, int | None] = {}
    for i in range(bc.repeats):
        for f in variants:
            model, steps, scale = setups[f]
            synchronize(device)
            c0 = time.process_time()
            with PeakMemory(device) as mem:
                g = generate(model, _settings(bc, steps, bc.seed + i, device), num_samples=bc.batch_size)
            cpu[f].append((time.process_time() - c0) * scale)
            wall[f].append(g.seconds * scale)
            nfes[f].append(round(g.nfe * scale))
            if mem.peak is not None:
                peaks[f] = max(peaks.get(f) or 0, mem.peak)
            kind = mem.kind
    rows = [_row(bc, f, length, nfe, device, setups[f], wall[f], cpu[f], nfes[f], peaks.get(f), kind)
            for f in variants]
    return [replace(r, speedup_vs={q.variant: q.median_s / r.median_s for q in rows if q is not r},
                    cpu_speedup_vs={q.variant: q.median_cpu_s / r.median_cpu_s for q in rows if q is not r})
            for r in rows]


def _row(bc: BenchConfig, variant: str, length: int, nfe: str | int, device: torch.device,
         setup: tuple[Backbone, int, float], wall: list[float], cpu: list[float], nfes: list[int],
         peak: int | None, peak_kind: str) -> BenchRow:
    model, steps, scale = setup
    median = statistics.median(wall)
    return BenchRow(
        variant=variant, family=model.config.family, length=length, nfe=int(statistics.median(nfes)),
        nfe_budget=str(nfe), batch_size=bc.batch_size, median_s=median, median_cpu_s=statistics.median(cpu),
        tokens_per_s=bc.batch_size * length / median, repeats=bc.repeats, warmup=bc.warmup,
        device=_device_name(device), d_model=bc.d_model, n_layers=bc.n_layers, n_heads=bc.n_heads,
        vocab_size=bc.vocab_size, dtype=bc.dtype, step_mode=bc.mode(device), schedule="power",
        params=sum(p.numel() for p in model.parameters()), kv_cache_bytes=kv_cache_bytes(model, bc.batch_size),
        peak_mem_bytes=peak, peak_mem_kind=peak_kind, torch=torch.__version__,
        extrapolated_from_nfe=steps if scale != 1.0 else None)


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(device)


def run_bench(bc: BenchConfig, device: torch.device, progress: bool = True,
              on_cell: Callable[[list[BenchRow]], None] | None = None) -> list[BenchRow]:
    """All cells (length x NFE budget x batch size), each row with its ratios over every other
    variant of its cell (``speedup_vs``: wall time, ``cpu_speedup_vs``: process CPU time).
    ``on_cell(rows so far)`` runs after every cell (the caller writes them out: ``write_bench``)."""
    bc = bc.resolved()
    if bc.threads:
        torch.set_num_threads(bc.threads)
    cells = [(L, n, b) for L in bc.lengths for n in bc.nfe for b in bc.batches(L)]
    rows: list[BenchRow] = []
    for L, n, b in tqdm(cells, desc="bench", disable=None if progress else True):
        rows += time_cell(bc, bc.variants, L, n, device, batch=b)
        if on_cell is not None:
            on_cell(rows)
    return rows


def settings_line(bc: BenchConfig, device: torch.device) -> str:
    """Every setting of a bench run, in one line."""
    bc = bc.resolved()
    keep = {k: v for k, v in asdict(bc).items() if k not in ("variants", "lengths", "suite")}
    keep["step_mode"] = bc.mode(device)
    text = " ".join(f"{k}={v}" for k, v in keep.items())
    return (f"bench on {_device_name(device)}, torch {torch.__version__}: {text}; random weights, "
            f"power schedule (even counts), medians of {bc.repeats} runs after {bc.warmup} warm-up "
            f"runs of the first {WARMUP_STEPS} forward passes of the timed configuration")


def format_rows(rows: list[BenchRow]) -> str:
    """A plain-text table: time, NFE, tokens/s, KV-cache and peak memory per cell ("-": not recorded)."""
    head = (f"{'variant':<10} {'L':>6} {'batch':>5} {'NFE':>6} {'median_s':>10} {'cpu_s':>9} {'tok/s':>9} "
            f"{'kv_MiB':>8} {'peak_MiB':>9}")
    out = [head]
    for r in rows:
        cpu = "-" if r.median_cpu_s is None else f"{r.median_cpu_s:.3f}"
        kv = "-" if r.kv_cache_bytes is None else f"{r.kv_cache_bytes / 2**20:.2f}"
        peak = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.1f}"
        note = f"  (timed at NFE={r.extrapolated_from_nfe}, scaled linearly)" if r.extrapolated_from_nfe else ""
        out.append(f"{r.variant:<10} {r.length:>6} {r.batch_size:>5} {r.nfe:>6} {r.median_s:>10.3f} {cpu:>9} "
                   f"{r.tokens_per_s:>9.1f} {kv:>8} {peak:>9}{note}")
    return "\n".join(out)
