"""``esolm doctor``: what this machine can run, checked on tiny cases.

The quick check (well under a minute on a CPU or a GPU) prints one line per check: the device,
the torch build, each dtype (a tiny backbone's logits in that dtype against float64), each
attention backend of ``esolm.model.attention`` on every mask kind against the ``math`` backend
in float64 (values, and gradients where the backend has a backward on this device), a tiny
``torch.compile``, and CUDA-graph decode steps against dynamic ones (GPUs only). A check is
``ok``, ``FAILED`` (it should work here and does not: the exit code is 1), ``unavailable``
(this machine or build lacks it) or ``not applicable``. The error printed is the largest
``|got - reference| / max(1, |reference|)`` over values and gradients.

``esolm doctor --full`` runs the complete device check instead (``esolm.doctor_full``: the
parts of ``esolm.doctor_parts`` and ``esolm.doctor_speed``), each part in its own process
under a share of one global deadline, each writing its file as soon as it has rows
(``python -m esolm.doctor part NAME --out DIR`` runs one part by hand).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from esolm.device import is_accelerator, pick_device
from esolm.doctor_checks import TOLERANCE, backend_error, backend_support, mask_cases, rel_error
from esolm.io import write_text_atomic
from esolm.model.attention import BACKENDS, AttentionMask

OK, FAILED, UNAVAILABLE, NOT_APPLICABLE = "ok", "FAILED", "unavailable", "not applicable"
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Check:
    """One line of the doctor: name, status (``OK`` ...), what was measured, the max error."""

    name: str
    status: str
    detail: str = ""
    error: float | None = None

    def line(self) -> str:
        err = "" if self.error is None else f"max err {self.error:.2e}; "
        return f"{self.name:<26} {self.status:<15} {err}{self.detail}"


def check_backend(backend: str, dtype: torch.dtype, device: torch.device, L: int = 8,
                  time_limit: float = 12.0) -> Check:
    """Every case of ``mask_cases`` against math; cases stop after ``time_limit`` s (a backend
    compiled on a GPU compiles per shape and mask: the full check runs them all)."""
    name = f"attention {backend}" + ("" if dtype == torch.float32 else f" [{_dtype_name(dtype)}]")
    runs, grads, note = backend_support(backend, device)
    if not runs:
        return Check(name, UNAVAILABLE, note)
    if backend == "flash" and dtype == torch.float32:
        note = "float32 runs as sdpa: flash kernels take half precision"
    cases = mask_cases(L, 2, device)
    worst, where, done, t0 = 0.0, "", 0, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks warn once; the doctor reports them itself
        for label, mask, n_q, n_kv in cases:
            if time.perf_counter() - t0 > time_limit:
                break
            err = backend_error(backend, mask, n_q, n_kv, dtype, device, grads)
            done += 1
            if not err <= worst:
                worst, where = err, label
    what = "values and gradients" if grads else "values"
    count = f"{len(cases)} masks" if done == len(cases) else f"{done} of {len(cases)} masks ({time_limit:.0f}s)"
    detail = f"{what}, {count} vs math (float64)" + (f"; {note}" if note else "")
    if worst > TOLERANCE[dtype]:
        return Check(name, FAILED, f"{detail}; worst on {where} (tolerance {TOLERANCE[dtype]:.0e})", worst)
    return Check(name, OK, detail, worst)


# --------------------------------------------------------------------------- the other checks
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_device(device: torch.device) -> Check:
    if not is_accelerator(device):
        return Check("device", OK, f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    p = torch.cuda.get_device_properties(device)
    return Check("device", OK, f"{p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB "
                 f"({torch.cuda.device_count()} visible)")


def check_torch(device: torch.device) -> Check:
    extra = ""
    if is_accelerator(device):
        extra = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return Check("torch", OK, f"{torch.__version__}{extra}, Python {sys.version.split()[0]}")


def tiny_model(device: torch.device, dtype: torch.dtype = torch.float32, family: str = "eso_b", **kw):
    """A 2-layer, d = 32 backbone with every weight random (non-uniform predictions)."""
    from esolm.config import ModelConfig
    from esolm.model.backbone import Backbone
    from esolm.profiling import random_weights

    base = dict(family=family, vocab_size=32, length=16, n_layers=2, d_model=32, n_heads=4, cond_dim=32,
                dropout=0.0)
    cfg = ModelConfig(**{**base, **kw})
    return random_weights(Backbone(cfg), std=0.1, seed=0).to(device, dtype).eval()


def check_dtype(dtype: torch.dtype, device: torch.device) -> Check:
    """A tiny backbone's forward in ``dtype`` against the same weights in float64."""
    name = f"dtype {_dtype_name(dtype)}"
    if dtype == torch.bfloat16 and is_accelerator(device) and not torch.cuda.is_bf16_supported():
        return Check(name, UNAVAILABLE, "this GPU has no bfloat16")
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.arange(16, device=device).expand(2, 16)
    with torch.no_grad():
        ref = tiny_model(device, torch.float64)(tokens, pos, AttentionMask("causal"))
        try:
            got = tiny_model(device, dtype)(tokens, pos, AttentionMask("causal"))
        except (RuntimeError, NotImplementedError) as err:
            if dtype == torch.float32:
                raise
            return Check(name, UNAVAILABLE, f"{type(err).__name__}: {str(err)[:120]}")
    err = rel_error(got, ref)
    status = OK if err <= TOLERANCE[dtype] else FAILED
    return Check(name, status, f"2-layer backbone logits vs float64 (tolerance {TOLERANCE[dtype]:.0e})", err)


def check_compile(device: torch.device) -> Check:
    """``torch.compile`` (inductor) of a tiny function against eager."""
    if not is_accelerator(device) and not any(shutil.which(c) for c in ("cc", "gcc", "clang", "c++")):
        return Check("torch.compile", UNAVAILABLE, "no C compiler on this machine (inductor needs one on CPU)")
    if is_accelerator(device) and importlib.util.find_spec("triton") is None:
        return Check("torch.compile", UNAVAILABLE, "triton is not installed")

    def fn(x: Tensor, w: Tensor) -> Tensor:
        h = x @ w
        return torch.softmax(h, dim=-1) * torch.nn.functional.gelu(h) + x.sin()

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=g).to(device), torch.randn(16, 16, generator=g).to(device)
    t0 = time.perf_counter()
    got = torch.compile(fn, dynamic=False, fullgraph=True)(x, w)
    err = rel_error(got, fn(x, w))
    status = OK if err <= TOLERANCE[torch.float32] else FAILED
    return Check("torch.compile", status, f"inductor, tiny function vs eager, {time.perf_counter() - t0:.1f}s", err)


def sample(model, num_samples: int, *, prompt: dict[int, int] | None = None, record_logits: bool = False,
           **settings: object):
    """``esolm.generate`` with the sampling settings as keywords (fields of ``ScheduleSettings``:
    steps, schedule, order, kv_cache, seed, step_mode, ...): the doctor's one call of it."""
    from esolm.config import ScheduleSettings
    from esolm.sampling import generate

    return generate(model, ScheduleSettings(**settings), num_samples=num_samples, prompt=prompt,
                    record_logits=record_logits)


def check_cuda_graphs(device: torch.device) -> Check:
    """Decode steps captured and replayed as CUDA graphs (``step_mode="cuda_graphs"``, i.e.
    ``graphs.StaticSteps``) against the dynamic cached path: Eso-LM (B) and AR, same seed."""
    if not is_accelerator(device):
        return Check("cuda graphs", NOT_APPLICABLE, "CUDA graphs need a GPU")
    worst, same = 0.0, True
    for family, kw in (("eso_b", {"alpha_0": 0.5}), ("ar", {})):
        model = tiny_model(device, family=family, **kw)
        runs = [sample(model, 2, steps=8, seed=3, record_logits=True, step_mode=m)
                for m in ("dynamic", "cuda_graphs")]
        same = same and torch.equal(runs[0].tokens, runs[1].tokens)
        worst = max([worst, *(rel_error(b, a) for a, b in zip(*(r.step_logits for r in runs)))])
    ok = same and worst <= TOLERANCE[torch.float32]
    return Check("cuda graphs", OK if ok else FAILED,
                 f"eso_b and ar decode steps, graphs vs dynamic; tokens {'equal' if same else 'DIFFER'}", worst)


def quick_checks(device: torch.device) -> list[tuple[str, Callable[[], Check]]]:
    """(name, check) in the order they run; names are what a check that raises reports."""
    out: list[tuple[str, Callable[[], Check]]] = [("device", lambda: check_device(device)),
                                                  ("torch", lambda: check_torch(device))]
    out += [(f"dtype {n}", lambda d=d: check_dtype(d, device)) for n, d in DTYPE_NAMES.items()]
    dtypes = [torch.float32] + ([torch.bfloat16] if is_accelerator(device) else [])
    out += [(f"attention {b}", lambda b=b, d=d: check_backend(b, d, device)) for d in dtypes for b in BACKENDS]
    out += [("torch.compile", lambda: check_compile(device)), ("cuda graphs", lambda: check_cuda_graphs(device))]
    return out


def run_quick(device: torch.device, json_path: str | Path | None = None, echo: bool = True) -> dict:
    """Run every quick check on ``device``, print one line each; the result (and ``json_path``)."""
    t0 = time.perf_counter()
    checks = []
    for name, fn in quick_checks(device):
        try:
            c = fn()
        except Exception as err:  # a check that raises is a failed check, reported
            c = Check(name, FAILED, f"{type(err).__name__}: {str(err)[:300]}")
        checks.append(c)
        if echo:
            print(c.line(), flush=True)
    failed = [c.name for c in checks if c.status == FAILED]
    result = {"device": str(device), "torch": torch.__version__, "ok": not failed, "failed": failed,
              "seconds": round(time.perf_counter() - t0, 2), "checks": [asdict(c) for c in checks]}
    if echo:
        print(f"{len(checks) - len(failed)} of {len(checks)} checks passed or do not apply here"
              + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" ({result['seconds']:.1f}s)")
    if json_path:
        write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The doctor's options (``esolm doctor`` and ``python -m esolm.doctor``)."""
    p.set_defaults(params=None)  # the doctor reads no parameter file (cli.main skips it): it runs in any folder
    p.add_argument("--device", default="auto", help="auto (default: the GPU if there is one), cpu, or a CUDA "
                   "device such as cuda:1")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the quick check's results here")
    p.add_argument("--full", action="store_true", help="the complete device check instead (minutes): "
                   "bf16 training steps, cached sampling, every backend x mask x dtype, static/CUDA-graph/"
                   "compiled decode steps, training throughput and MFU at GPT-2-small size, the paper's "
                   "sampling-speed table; one process per part, files under --out as each part finishes")
    p.add_argument("--out", default="runs/doctor", help="folder of --full's files (default runs/doctor): "
                   "env.json, a_bf16.json, c_cache.json, b_attn.json, d_steps.json, f_train.json, "
                   "e_bench.jsonl, run.log, summary.json")
    p.add_argument("--budget", type=float, default=460.0, metavar="SECONDS",
                   help="wall-clock seconds for every part of --full together (default 460)")
    p.add_argument("--smoke", action="store_true", help="--full on CPU at tiny sizes (well under a minute): "
                   "checks the check's own logic")
    p.add_argument("--only", default="", help="--full: comma-separated parts to run (env,a,c,b,d,f,e)")


def run(args: argparse.Namespace) -> int:
    """The verb: 0 when every check that should work here works, else 1."""
    if not args.full:
        return 0 if run_quick(pick_device(args.device), args.json)["ok"] else 1
    from esolm.doctor_full import PARTS, run_full

    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(f"--only {unknown}: unknown parts; use any of {list(PARTS)}")
    if not args.smoke:
        pick_device(args.device)  # a GPU asked for on a machine without one: say so now
    parts = [(n, p.share) for n, p in PARTS.items() if not wanted or n in wanted]
    return 0 if run_full(args.out, args.budget, args.smoke, args.device, parts)["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m esolm.doctor [options]`` as ``esolm doctor``; ``python -m esolm.doctor part
    NAME --out DIR [--deadline T] [--smoke] [--device D]`` runs one part of the full check."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["part"]:
        from esolm.doctor_full import part_main

        return part_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m esolm.doctor", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
