"""Side-by-side sampling speed of every family on the same backbone (method.md section 6).

Every family samples ``batch_size`` sequences of length L with the same backbone size and
random weights (speed does not depend on the weights). ``nfe="L"`` decodes one token per
forward pass (the paper's setting); an integer NFE budget spreads L tokens over that many
steps (AR always takes L). Each cell is the median wall time over ``repeats`` runs after
``warmup`` runs, and ratios are computed from medians measured in the same process.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esolm.config import ModelConfig
from esolm.model.backbone import Backbone
from esolm.sampling import generate

# name -> (variant, overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "eso_b": ("eso_b", {"alpha_0": 1.0}),
    "eso_a": ("eso_a", {"alpha_0": 1.0}),
    "mdlm": ("mdlm", {}),
    "bd3lm_l4": ("bd3lm", {"block_size": 4}),
    "bd3lm_l16": ("bd3lm", {"block_size": 16}),
    "ar": ("ar", {}),
}


@dataclass(frozen=True)
class BenchConfig:
    families: tuple[str, ...] = tuple(FAMILIES)
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    nfe: tuple[str | int, ...] = ("L",)
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"bench.families has unknown entries {unknown}; use any of {tuple(FAMILIES)}")
        if self.repeats < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError("bench.repeats and bench.batch_size must be >= 1, bench.warmup >= 0")


def _model(bc: BenchConfig, family: str, length: int, device: torch.device) -> Backbone:
    variant, extra = FAMILIES[family]
    cfg = ModelConfig(variant=variant, vocab_size=bc.vocab_size, length=length, n_layers=bc.n_layers,
                      d_model=bc.d_model, n_heads=bc.n_heads, dropout=0.0, **extra)
    torch.manual_seed(bc.seed)
    return Backbone(cfg).to(device).eval()


def _steps(model: Backbone, length: int, nfe: str | int) -> int:
    """Diffusion steps that give the requested NFE (per block for BD3-LM)."""
    budget = length if nfe == "L" else int(nfe)
    if model.config.variant == "bd3lm":
        return max(1, budget * model.config.block_size // length)
    return max(1, budget)


def time_family(bc: BenchConfig, family: str, length: int, nfe: str | int,
                device: torch.device) -> dict:
    """Median sampling time of one family at one length and NFE budget."""
    model = _model(bc, family, length, device)
    steps = _steps(model, length, nfe)
    times, nfes = [], []
    for i in range(bc.warmup + bc.repeats):
        g = generate(model, num_samples=bc.batch_size, steps=steps, schedule="power", seed=bc.seed + i)
        if i >= bc.warmup:
            times.append(g.seconds)
            nfes.append(g.nfe)
    median = statistics.median(times)
    return {"family": family, "length": length, "nfe": int(statistics.median(nfes)),
            "nfe_budget": str(nfe), "batch_size": bc.batch_size, "median_s": median,
            "tokens_per_s": bc.batch_size * length / median, "repeats": bc.repeats,
            "device": _device_name(device), "d_model": bc.d_model, "n_layers": bc.n_layers}


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(device)


def run_bench(bc: BenchConfig, device: torch.device, progress: bool = True) -> list[dict]:
    """All cells, plus ``speedup_vs_<family>`` ratios of eso_b over every other family."""
    cells = [(f, L, n) for L in bc.lengths for n in bc.nfe for f in bc.families]
    rows = [time_family(bc, f, L, n, device)
            for f, L, n in tqdm(cells, desc="bench", disable=not progress)]
    by_key = {(r["family"], r["length"], r["nfe_budget"]): r for r in rows}
    for r in rows:
        for other in bc.families:
            ref = by_key.get((other, r["length"], r["nfe_budget"]))
            if ref is not None and other != r["family"]:
                r[f"speedup_vs_{other}"] = ref["median_s"] / r["median_s"]
    return rows


def plot_bench(rows: list[dict], path: str) -> bool:
    """Speedup of Eso-LM (B) over each family against sequence length, from rows with
    family, length, nfe_budget and median_s (NFE = L rows only). False when there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["nfe_budget"] == "L"]
    eso = {r["length"]: r["median_s"] for r in rows if r["family"] == "eso_b"}
    if not eso:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for fam in sorted({r["family"] for r in rows} - {"eso_b"}):
        pts = sorted((r["length"], r["median_s"] / eso[r["length"]]) for r in rows
                     if r["family"] == fam and r["length"] in eso)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"over {fam}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (NFE = L)")
    ax.set_ylabel("Eso-LM (B) speedup (x)")
    ax.legend(fontsize=7)
    first = rows[0]
    ax.set_title(f"batch {first.get('batch_size', '?')}, {first.get('device', '')}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
