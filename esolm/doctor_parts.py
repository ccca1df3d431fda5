"""The parts of ``esolm doctor --full``: each runs in its own process (``python -m esolm.doctor
part NAME --out DIR --deadline T``) and writes its rows to its file under DIR as it makes them.

- env: versions, devices, SDPA kernels, which optional packages are present, esolm imports.
- a: one training step per family in bf16 autocast against float32 (loss, gradient cosine,
  q/k/v dtypes at attention, finite weights after AdamW), every backend on four families.
- c: cached against uncached sampling (same tokens; step logits), float32 and float64.
- b: every attention backend against math in float64 on every mask kind, values and gradients,
  float32 and bfloat16 (on GPUs also SDPA's single kernels on the plain masks).
- d: static, CUDA-graph and compiled decode steps against dynamic ones; a many-shape schedule.
- f: training throughput (tokens/s), peak memory and MFU at GPT-2-small size (preset owt-small).
- e: the sampling-speed table at the paper's size (``esolm.bench`` preset paper-gpu: L 2048 and
  8192, NFE = L, batch 1 then the authors' batches): cached families replay CUDA graphs, MDLM is
  timed over a few steps and scaled (rows say so), rows that cannot finish in the time left are
  skipped with their projection; e_bench.jsonl, then e_table.txt (the table and Eso-LM (B)'s
  speedups).

f and e live in ``esolm.doctor_speed``; the table of parts and the driver in ``esolm.doctor_full``.

A row's ``ok`` is True, False (a failure: the part exits 1) or None (not applicable, skipped).
With ``--smoke`` every part runs on the CPU at tiny sizes, to check the parts themselves.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import math
import shutil
import sys
import time

import torch

from esolm.device import is_accelerator
from esolm.doctor import sample
from esolm.doctor_checks import TOLERANCE, attention_error, backend_error, backend_support, mask_cases, rel_error
from esolm.doctor_full import Ctx, Rows, failure
from esolm.io import write_text_atomic
from esolm.model.attention import BACKENDS, AttentionMask


def model(family: str, kw: dict, size: dict, device: torch.device, dtype: torch.dtype = torch.float32,
          std: float = 0.1):
    """A backbone with every weight random (predictions far from uniform), eval mode."""
    from esolm.config import ModelConfig
    from esolm.model.backbone import Backbone
    from esolm.profiling import random_weights

    cfg = ModelConfig(family=family, dropout=0.0, **size, **kw)
    return random_weights(Backbone(cfg), std=std, seed=0).to(device, dtype).eval()


# --------------------------------------------------------------------------- env
OPTIONAL = ("triton", "lightning", "transformers", "safetensors", "tokenizers", "numpy", "flash_attn", "pytest",
            "prefect", "dvc", "optuna", "duckdb", "datasets", "matplotlib", "pyarrow")
NEEDED = ("esolm.bench", "esolm.sampling", "esolm.likelihood", "esolm.checkpoint", "esolm.text", "esolm.training",
          "esolm.cli")


def part_env(ctx: Ctx) -> bool:
    from esolm.doctor import check_device, check_torch
    from esolm.model.attention import flash_available, sdpa_flash_available

    info: dict = {"python": sys.version, "torch": check_torch(ctx.device).detail,
                  "device": check_device(ctx.device).detail, "c_compiler": shutil.which("cc") or shutil.which("gcc"),
                  "esolm_flash_attn": flash_available(), "sdpa_flash_kernel": sdpa_flash_available(),
                  "packages": {m: _version(m) for m in OPTIONAL}}
    if is_accelerator(ctx.device):
        b = torch.backends.cuda
        info["sdpa_enabled"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                                "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}
    info["imports"] = {}
    for m in NEEDED:
        try:
            importlib.import_module(m)
            info["imports"][m] = "ok"
        except Exception as err:  # recorded in the row
            info["imports"][m] = f"{type(err).__name__}: {err}"
    info["ok"] = all(v == "ok" for v in info["imports"].values())
    write_text_atomic(ctx.out / "env.json", json.dumps(info, indent=1, default=str) + "\n")
    print(json.dumps(info, indent=1, default=str))
    return info["ok"]


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "present"


# --------------------------------------------------------------------------- a: bf16 training steps
FAMILIES_A = [("ar", {}), ("mdlm", {}), ("bd3lm", {"block_size": 4}), ("eso_a", {"alpha_0": 0.25}),
              ("eso_b", {"alpha_0": 0.25}), ("eso_b", {"alpha_0": 1.0})]
ALL_BACKENDS_A = ("ar", "bd3lm", "eso_a", "eso_b")  # alpha_0 0.25 only: the others run sdpa alone
SLOW_LAST = sorted(BACKENDS, key=lambda b: b == "flex")  # flex compiles per mask on a GPU: its rows last


def part_a(ctx: Ctx) -> bool:
    import esolm.model.backbone as backbone

    seen: set[tuple[str, ...]] = set()
    original = backbone.attention

    def spy(q, k, v, mask, backend="sdpa"):
        seen.add(tuple(str(t.dtype).removeprefix("torch.") for t in (q, k, v)))
        return original(q, k, v, mask, backend)

    if hasattr(backbone, "attention"):  # the backbone's one attention call: q, k, v dtypes seen
        backbone.attention = spy
    size = (dict(vocab_size=64, length=32, n_layers=2, d_model=64, n_heads=4, cond_dim=32) if ctx.smoke
            else dict(vocab_size=1024, length=128, n_layers=4, d_model=256, n_heads=4, cond_dim=128))
    rows = Rows(ctx.out / "a_bf16.json")
    for backend in SLOW_LAST:
        for family, kw in FAMILIES_A:
            if backend != "sdpa" and (family not in ALL_BACKENDS_A or kw.get("alpha_0") == 1.0):
                continue
            row = {"family": family, **kw, "backend": backend}
            if not backend_support(backend, ctx.device)[1]:
                rows.add({**row, "ok": None, "skipped": backend_support(backend, ctx.device)[2]})
                continue
            if ctx.left() < 5:
                rows.add({**row, "ok": None, "skipped": "no time left"})
                continue
            try:
                row.update(_bf16_step(family, kw, backend, size, 4 if ctx.smoke else 16, ctx.device, seen))
            except Exception as err:  # recorded in the row
                row.update(failure(err))
            rows.add(row)
    return rows.ok


def _bf16_step(family: str, kw: dict, backend: str, size: dict, batch: int, device: torch.device,
               seen: set) -> dict:
    """Loss and gradients of one step in float32 and under bf16 autocast, then one AdamW step."""
    from esolm.objectives import loss

    split = {"batch_split": 0.5} if 0 < kw.get("alpha_0", 0) < 1 else {}
    net = model(family, {**kw, **split, "attn_backend": backend}, size, device, std=0.06).train()
    x = torch.randint(0, size["vocab_size"], (batch, size["length"]), generator=torch.Generator().manual_seed(1))
    x = x.to(device)

    def step(bf16: bool) -> tuple[float, list[torch.Tensor], list]:
        net.zero_grad(set_to_none=True)
        seen.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = loss(net, x, generator=torch.Generator().manual_seed(3))
        out.per_token.backward()
        grads = [p.grad.double().flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64,
                 device=device) for p in net.parameters()]
        return float(out.per_token), grads, sorted(seen)

    t0 = time.perf_counter()
    l32, g32, _ = step(False)
    l16, g16, dtypes = step(True)
    cos = float(torch.nn.functional.cosine_similarity(torch.cat(g16), torch.cat(g32), dim=0))
    per = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(g16, g32) if b.norm() > 1e-8]
    torch.optim.AdamW(net.parameters(), lr=1e-3).step()
    finite = math.isfinite(l16) and all(bool(p.isfinite().all()) for p in net.parameters())
    rel = abs(l16 - l32) / abs(l32)
    one_dtype = all(len(set(d)) == 1 for d in dtypes)
    return {"loss_fp32": l32, "loss_bf16": l16, "rel_diff": rel, "grad_cos": cos, "min_param_cos": min(per),
            "qkv_dtypes_bf16": dtypes, "finite_after_adamw": finite, "s": round(time.perf_counter() - t0, 2),
            "ok": finite and rel < 1e-2 and cos > 0.99 and one_dtype}


# --------------------------------------------------------------------------- c: cached vs uncached
CASES_C = [("eso_b", {"alpha_0": 0.5}, {"steps": 32}), ("eso_b", {"alpha_0": 1.0}, {"steps": 32}),
           ("eso_b", {"alpha_0": 0.5}, {"order": "block", "subcontexts": 4}),
           ("eso_a", {"alpha_0": 0.5}, {"steps": 32}),
           ("bd3lm", {"block_size": 4}, {"steps": 4}), ("ar", {}, {}),
           ("eso_b", {"alpha_0": 0.5}, {"steps": 16, "prompt": {0: 1, 5: 2, 9: 3}})]


def part_c(ctx: Ctx) -> bool:
    size = (dict(vocab_size=16, length=32, n_layers=2, d_model=32, n_heads=4, cond_dim=32) if ctx.smoke
            else dict(vocab_size=512, length=128, n_layers=4, d_model=256, n_heads=8, cond_dim=128))
    rows = Rows(ctx.out / "c_cache.json")
    for family, kw, opts in CASES_C:
        for dtype in (torch.float32, torch.float64):
            row = {"family": family, **kw, **{k: v for k, v in opts.items() if k != "prompt"},
                   "prompt": "prompt" in opts, "dtype": str(dtype).removeprefix("torch.")}
            if ctx.left() < 3:
                rows.add({**row, "ok": None, "skipped": "no time left"})
                continue
            try:
                net = model(family, kw, size, ctx.device, dtype, std=0.12)
                runs = [sample(net, 4, seed=4, record_logits=True, kv_cache=kv, **opts)
                        for kv in (True, False)]
                same = torch.equal(runs[0].tokens, runs[1].tokens)
                err = max((rel_error(a, b) for a, b in zip(runs[0].step_logits, runs[1].step_logits)), default=0.0)
                row.update(tokens_equal=same, nfe=[r.nfe for r in runs], kv_cache_used=runs[0].kv_cache,
                           max_logit_err=err, ok=same and err <= TOLERANCE[dtype])
            except Exception as err:  # recorded in the row
                row.update(failure(err))
            rows.add(row)
    return rows.ok


# --------------------------------------------------------------------------- b: backends vs math
def part_b(ctx: Ctx) -> bool:
    L, B, H, D = (8, 2, 2, 16) if ctx.smoke else (64, 2, 4, 64)
    rows = Rows(ctx.out / "b_attn.json")
    for backend in SLOW_LAST:
        for dtype in (torch.float32, torch.bfloat16):
            runs, grads, note = backend_support(backend, ctx.device)
            if not runs:
                rows.add({"backend": backend, "dtype": str(dtype)[6:], "ok": None, "unavailable": note})
                continue
            for label, mask, n_q, n_kv in mask_cases(L, B, ctx.device):
                row = {"backend": backend, "dtype": str(dtype)[6:], "mask": label, "n_q": n_q, "n_kv": n_kv,
                       "gradients": grads}
                if ctx.left() < 3:
                    rows.add({**row, "ok": None, "skipped": "no time left"})
                    continue
                try:
                    err = backend_error(backend, mask, n_q, n_kv, dtype, ctx.device, grads, B=B, H=H, D=D)
                    row.update(max_err=err, ok=err <= TOLERANCE[dtype])
                except Exception as e:  # recorded in the row
                    row.update(failure(e))
                rows.add(row)
            if backend == "sdpa" and is_accelerator(ctx.device):
                _sdpa_kernels(ctx, rows, dtype, L, B, H, D)
    return rows.ok


def _sdpa_kernels(ctx: Ctx, rows: Rows, dtype: torch.dtype, L: int, B: int, H: int, D: int) -> None:
    """SDPA's flash, memory-efficient and cuDNN kernels alone on the full and causal masks
    (a kernel that does not serve this dtype here is recorded as unsupported, ok None)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for kind in ("full", "causal"):
            row = {"backend": f"sdpa[{kernel.name}]", "dtype": str(dtype)[6:], "mask": kind, "gradients": True}

            def fn(q, k, v, kernel=kernel, kind=kind):
                with sdpa_kernel([kernel]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")

            try:
                err = attention_error(fn, AttentionMask(kind), L, L, dtype, ctx.device, True, B=B, H=H, D=D)
                row.update(max_err=err, ok=err <= TOLERANCE[dtype])
            except RuntimeError as e:
                row.update(ok=None, unsupported=str(e).splitlines()[0][:200])
            rows.add(row)


# --------------------------------------------------------------------------- d: decode step modes
def part_d(ctx: Ctx) -> bool:
    L = 32 if ctx.smoke else 64
    size = dict(vocab_size=64, length=L, n_layers=2, d_model=64 if ctx.smoke else 128, n_heads=4, cond_dim=32)
    cases = [("eso_b", {"alpha_0": 0.5}, {"steps": 16}), ("eso_b", {"alpha_0": 1.0}, {"steps": L, "schedule": "power"}),
             ("ar", {}, {}), ("ar", {}, {"prompt": {0: 1, 1: 2}})]
    rows = Rows(ctx.out / "d_steps.json")
    for mode in ("static", "cuda_graphs", "many shapes", "compile"):  # compiling last: it takes longest
        if mode == "many shapes":
            rows.add(_many_shapes(ctx))
            continue
        for family, kw, opts in cases:
            row = {"mode": mode, "family": family, **kw, **{k: str(v) for k, v in opts.items()}}
            why = _d_skip(ctx, mode, opts)
            if why:
                rows.add({**row, "ok": None, "skipped": why})
                continue
            try:
                net = model(family, kw, size, ctx.device, std=0.18)
                runs, secs = [], []
                for m in ("dynamic", mode):
                    t0 = time.perf_counter()
                    runs.append(sample(net, 3, seed=4, record_logits=True, step_mode=m, **opts))
                    secs.append(time.perf_counter() - t0)
                same = torch.equal(runs[0].tokens, runs[1].tokens)
                err = max(rel_error(b, a) for a, b in zip(runs[0].step_logits, runs[1].step_logits))
                tol = 1e-3 if mode == "compile" else 1e-4
                row.update(tokens_equal=same, max_logit_err=err, dynamic_s=secs[0], mode_s=secs[1],
                           ok=same and err <= tol)
            except Exception as err:  # recorded in the row
                row.update(failure(err))
            rows.add(row)
    return rows.ok


def _d_skip(ctx: Ctx, mode: str, opts: dict) -> str:
    if mode == "cuda_graphs" and not is_accelerator(ctx.device):
        return "needs a GPU (on a CPU it runs as static)"
    if mode == "compile":
        if "prompt" in opts or (opts and opts.get("schedule") != "power"):
            return "a random schedule has many step shapes, one compilation each"
        if ctx.smoke:
            return "smoke: compiling takes longer than a smoke run"
        if ctx.left() < 60:
            return "no time left to compile"
    return "no time left" if ctx.left() < 5 else ""


def _many_shapes(ctx: Ctx) -> dict:
    """Eso-LM (B) at alpha_0 = 0.25 over 64 steps of the default schedule (many step shapes):
    CUDA graphs (static steps on a CPU) against dynamic; time and GPU memory reserved."""
    L = 128 if ctx.smoke else 1024
    mode = "cuda_graphs" if is_accelerator(ctx.device) else "static"
    row = {"mode": mode, "family": "eso_b", "alpha_0": 0.25, "case": f"many step shapes: L={L}, 64 steps"}
    if ctx.left() < 10:
        return {**row, "ok": None, "skipped": "no time left"}
    try:
        size = dict(vocab_size=512, length=L, n_layers=2, d_model=128, n_heads=4, cond_dim=32)
        net = model("eso_b", {"alpha_0": 0.25}, size, ctx.device)
        reserved = torch.cuda.memory_reserved(ctx.device) if is_accelerator(ctx.device) else 0
        t0 = time.perf_counter()
        ref = sample(net, 2, steps=64, seed=1, step_mode="dynamic")
        t1 = time.perf_counter()
        got = sample(net, 2, steps=64, seed=1, step_mode=mode)
        row.update(tokens_equal=torch.equal(ref.tokens, got.tokens), nfe=got.nfe, dynamic_s=t1 - t0,
                   mode_s=time.perf_counter() - t1, ok=torch.equal(ref.tokens, got.tokens))
        if is_accelerator(ctx.device):
            row["reserved_growth_mib"] = (torch.cuda.memory_reserved(ctx.device) - reserved) / 2**20
    except Exception as err:  # recorded in the row
        row.update(failure(err))
    return row
