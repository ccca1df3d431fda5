"""Device probe after the first GPU run: why dynamic decode steps take 44-61 ms, and the fixes.
python3 .device/probe.py OUT [--smoke]"""
import json, os, statistics, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT))
import torch
import importlib
att = importlib.import_module("esolm.model.attention")
import esolm.model.backbone as bb
from esolm.bench import BenchConfig, _model
from esolm.sampling import generate

out = Path(sys.argv[1]); smoke = "--smoke" in sys.argv
T0 = time.time(); DEADLINE = T0 + (60 if smoke else 215)
dev = torch.device("cpu" if smoke else "cuda")
log = open(out / "probe.jsonl", "a")
def emit(**row):
    row["t"] = round(time.time() - T0, 1); print(json.dumps(row, default=str), flush=True)
    log.write(json.dumps(row, default=str) + "\n"); log.flush()
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
size = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=101) if smoke else \
    dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50257)
bc = BenchConfig(dtype="float32" if smoke else "bfloat16", **size)
L = 256 if smoke else 2048
new_prebuild = bb.prebuild
def old_prebuild(spec, batch, n_q, n_kv, device, backend):  # the code before this fix: a dense tail mask
    if backend == "flex" or att._is_plain(spec, n_q, n_kv): return spec
    b = att._tail_block(spec, n_q, n_kv)
    if b: return replace(spec, dense=att.tail_mask(b, n_q, n_kv, device))
    return replace(spec, dense=att.dense_mask(spec, batch, n_q, n_kv, device))

# ---- part 1: one AR decode step at cache length ~L/2, old vs new vs old without cuDNN
model = _model(bc, "ar", L, dev)
mask = model.config.spec.clean_mask(model.config)
def decode_steps(n_steps):
    with model.inference():
        cache = model.new_cache(1); cond = model.conditioning()
        pos = torch.arange(L, device=dev)[None]; tok = torch.randint(0, 50, (1, L), device=dev)
        model(tok[:, :L // 2], pos[:, :L // 2], mask, cache=cache, commit=L // 2, logits_for=slice(-1, None), cond=cond)
        times = []
        for i in range(L // 2, L // 2 + n_steps):
            sync(); t = time.perf_counter()
            model(tok[:, i:i + 1], pos[:, i:i + 1], mask, cache=cache, commit=1, logits_for=slice(-1, None), cond=cond)
            sync(); times.append(time.perf_counter() - t)
    return statistics.median(times[4:]) * 1e3
from torch.nn.attention import SDPBackend, sdpa_kernel
variants = {"new": (new_prebuild, None), "old": (old_prebuild, None)}
if dev.type == "cuda":
    variants["old_no_cudnn"] = (old_prebuild, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    variants["old_cudnn_only"] = (old_prebuild, [SDPBackend.CUDNN_ATTENTION])
for rnd in range(2):
    for name, (pb, kernels) in variants.items():
        bb.prebuild = pb
        try:
            if kernels:
                with sdpa_kernel(kernels): ms = decode_steps(24)
            else: ms = decode_steps(24)
            emit(part="decode_step", round=rnd, variant=name, family="ar", L=L, cache=L // 2, ms_per_step=ms)
        except Exception as e:
            emit(part="decode_step", variant=name, error=f"{type(e).__name__}: {e}"[:300])
bb.prebuild = new_prebuild
# which kernels the old path runs (profiler, 4 steps)
try:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    bb.prebuild = old_prebuild
    with profile(activities=acts) as prof: decode_steps(6)
    bb.prebuild = new_prebuild
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    (out / "profile_old.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=18) + "\n\n" +
                                         prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    emit(part="profile", ok=True)
except Exception as e:
    bb.prebuild = new_prebuild; emit(part="profile", error=f"{type(e).__name__}: {e}"[:300])
# attention dtypes under bf16 autocast (training) and the flash backend
try:
    seen = []; orig = bb.attention
    bb.attention = lambda q, k, v, spec, backend="sdpa": (seen.append((q.dtype, k.dtype, v.dtype)), orig(q, k, v, spec, backend))[1]
    from esolm import ModelConfig, build_model, loss
    for fam, kw in (("eso_b", {"alpha_0": 0.25, "batch_split": 0.5}), ("ar", {})):
        for backend in ("sdpa", "flash"):
            seen.clear()
            m = build_model(ModelConfig(family=fam, vocab_size=256, length=64, n_layers=2, d_model=128, n_heads=4, cond_dim=64, attn_backend=backend, init="normal", **kw)).to(dev)
            x = torch.randint(0, 256, (4, 64), device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                lo = loss(m, x, generator=torch.Generator().manual_seed(0))
            lo.per_token.backward()
            emit(part="autocast_dtypes", family=fam, backend=backend, dtypes=sorted({str(t) for s in seen for t in s}), loss=float(lo.per_token))
    bb.attention = orig
except Exception as e:
    bb.attention = orig; emit(part="autocast_dtypes", error=f"{type(e).__name__}: {e}"[:300])
del model
# ---- part 2: the prepared check's stages a and b on this code
if not smoke or True:
    chk = out / "chk"; chk.mkdir(exist_ok=True)
    budget = 40 if smoke else min(110, DEADLINE - time.time() - 70)
    r = subprocess.run([sys.executable, str(ROOT / ".device/gpu_check.py"), "all", "--only", "a,b", "--out", str(chk), "--budget", str(budget)] + (["--smoke"] if smoke else []), capture_output=True, text=True)
    emit(part="check_ab", rc=r.returncode, tail=r.stdout[-600:])
# ---- part 3: NFE = L at batch 1 with the new dynamic path (and graphs), as time allows
for fam, mode, steps in (("ar", "dynamic", L), ("eso_b", "dynamic", L), ("bd3lm_l4", "dynamic", 4), ("mdlm", "dynamic", 64),
                         ("eso_b", "cuda_graphs", L), ("ar", "cuda_graphs", L)):
    if time.time() > DEADLINE - 25: emit(part="bench", skipped=f"{fam} {mode}: no time"); continue
    try:
        m = _model(bc, fam, L, dev)
        generate(m, num_samples=1, steps=min(steps, 16), schedule="power", seed=1, step_mode=mode)
        g = generate(m, num_samples=1, steps=steps, schedule="power", seed=0, step_mode=mode)
        emit(part="bench", family=fam, step_mode=mode, L=L, batch=1, steps=steps, nfe=g.nfe, seconds=g.seconds,
             ms_per_forward=g.seconds / g.nfe * 1e3, dtype=bc.dtype)
        del m
    except Exception as e:
        emit(part="bench", family=fam, step_mode=mode, error=f"{type(e).__name__}: {e}"[:300])
emit(part="done", total_s=time.time() - T0)
