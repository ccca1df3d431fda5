"""The machinery of ``esolm doctor --full``: the table of parts, one part's process, and the
driver that runs every part in turn under one deadline.

Each part (``PARTS``: the checks of ``esolm.doctor_parts`` and ``esolm.doctor_speed``, or any
``module:function`` taking a ``Ctx``) runs in its own process (``python -m esolm.doctor part
NAME --out DIR --deadline T``), in its own process group, under its share of what is left of the
budget; a part that runs past its share is killed with everything it started and recorded as a
timeout, and the next part runs. A part writes its rows through ``Rows`` as it makes them, so a
kill loses only the row in progress. ``DIR/run.log`` gets every part's output (appended);
``DIR/summary.json``, rewritten after every part, says what each one did: ok, FAILED (a row
failed), error (it raised: the exception), timeout or skipped, with its seconds, its limit and
the rows of its files. Nothing here needs pytest, prefect, dvc, optuna, duckdb or flash-attn.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from esolm.device import pick_device
from esolm.io import write_text_atomic

PART_STATUS = {0: "ok", 1: "FAILED"}  # a part's exit code -> its status ("error" otherwise)


@dataclass
class Ctx:
    """What a part gets: its output folder, device, tiny sizes or not, and its deadline."""

    out: Path
    device: torch.device
    smoke: bool
    deadline: float

    def left(self) -> float:
        return self.deadline - time.time()


class Rows:
    """The rows of one file, on disk as soon as each is added: a JSON list rewritten atomically,
    or (``.jsonl``) one line appended and flushed per row."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, []
        if path.suffix == ".jsonl":
            path.write_text("")

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print({k: v for k, v in row.items() if k != "trace"}, flush=True)
        if self.path.suffix == ".jsonl":
            with self.path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        else:
            write_text_atomic(self.path, json.dumps(self.rows, indent=1, default=str) + "\n")
        return row

    @property
    def ok(self) -> bool:
        return all(r.get("ok") is not False for r in self.rows)


def failure(err: BaseException) -> dict:
    return {"ok": False, "error": f"{type(err).__name__}: {err}"[:400], "trace": traceback.format_exc()[-1500:]}


# --------------------------------------------------------------------------- the table of parts
@dataclass(frozen=True)
class Part:
    """target: ``module:function`` taking a ``Ctx`` and returning whether every row is ok;
    share: its weight in the global budget; files: what it writes under the output folder."""

    target: str
    share: float
    files: tuple[str, ...]


PARTS: dict[str, Part] = {
    "env": Part("esolm.doctor_parts:part_env", 20, ("env.json",)),
    "a": Part("esolm.doctor_parts:part_a", 45, ("a_bf16.json",)),
    "c": Part("esolm.doctor_parts:part_c", 30, ("c_cache.json",)),
    "b": Part("esolm.doctor_parts:part_b", 75, ("b_attn.json",)),
    "d": Part("esolm.doctor_parts:part_d", 80, ("d_steps.json",)),
    "f": Part("esolm.doctor_speed:part_f", 75, ("f_train.json",)),
    "e": Part("esolm.doctor_speed:part_e", 170, ("e_bench.jsonl",)),
}


def resolve(name: str) -> Callable[[Ctx], bool | None]:
    """A part of ``PARTS`` by name, or any ``module:function`` (an extra check of one's own)."""
    target = PARTS[name].target if name in PARTS else name
    module, sep, func = target.partition(":")
    if not sep:
        raise ValueError(f"part {name!r} is unknown: use one of {list(PARTS)} or module:function")
    return getattr(importlib.import_module(module), func)


def file_counts(out: Path, name: str) -> dict:
    """{"files": {file: rows written, rows failed}} of a part of ``PARTS`` (missing files: None)."""
    if name not in PARTS:
        return {}
    files = {}
    for f in PARTS[name].files:
        path = out / f
        if not path.exists():
            files[f] = None
            continue
        try:
            text = path.read_text()
            rows = [json.loads(x) for x in text.splitlines() if x.strip()] if f.endswith(".jsonl") else json.loads(text)
        except ValueError:
            files[f] = "unreadable"
            continue
        rows = rows if isinstance(rows, list) else [rows]
        files[f] = {"rows": len(rows), "failed": sum(r.get("ok") is False for r in rows)}
    return {"files": files}


def part_main(argv: list[str]) -> int:
    """One part in this process: 0 when its rows are ok, 1 when one failed, 2 when it raised
    (the traceback, then a line ``doctor part NAME: error: ...`` that the driver records)."""
    p = argparse.ArgumentParser(prog="python -m esolm.doctor part")
    p.add_argument("name", help=f"one of {list(PARTS)}, or module:function")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=0.0, help="absolute time (epoch s) to finish by")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    share = PARTS[args.name].share if args.name in PARTS else 60.0
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    ctx = Ctx(out, device, args.smoke, args.deadline or time.time() + share)
    try:
        ok = resolve(args.name)(ctx)
    except Exception as err:  # reported to the driver
        traceback.print_exc()
        print(f"doctor part {args.name}: error: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr, flush=True)
        return 2
    return 1 if ok is False else 0


# --------------------------------------------------------------------------- the full check's driver
MIN_PART_S = 10.0  # the least a part is given (when the budget allows): start-up and imports


def _share(left: float, parts: list[tuple[str, float]], i: int, least: float = MIN_PART_S) -> float:
    """Seconds for part i: its share of what is left among the parts still to run (the last one
    gets all of it), at least ``least`` or an even split of what is left, never more than left."""
    rest = parts[i:]
    if len(rest) == 1:
        return left
    share = left * rest[0][1] / sum(s for _, s in rest)
    return min(left, max(share, min(least, left / len(rest))))


def _die_with_parent() -> None:
    """In a part's process before exec (Linux): SIGKILL when the driver dies, even by SIGKILL
    (a part runs in its own session, out of reach of signals sent to the driver's group)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_part(name: str, out: Path, limit: float, smoke: bool, device: str, log) -> dict:
    """One part in its own process group, killed (with anything it started) after ``limit`` s."""
    grace = min(5.0, 0.15 * limit)
    cmd = [sys.executable, "-m", "esolm.doctor", "part", name, "--out", str(out),
           "--deadline", f"{time.time() + limit - grace:.1f}", "--device", device] + (["--smoke"] if smoke else [])
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}  # run.log shows how far a killed part got
    if smoke:  # tiny sizes gain nothing from threads, and threads that spin lose much on a busy CPU
        env["OMP_NUM_THREADS"] = "1"
    log.write(f"\n===== part {name}: limit {limit:.0f}s =====\n")
    log.flush()
    offset = log.tell()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        rc = proc.wait(timeout=limit)
        status = PART_STATUS.get(rc, "error")
    except subprocess.TimeoutExpired:
        rc, status = None, "timeout"
    finally:  # a timeout, or the driver stopped (Ctrl-C, SIGTERM): the part and all it started go
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rc = proc.returncode if rc is None else rc
    record = {"status": status, "rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": round(limit, 1)}
    log.write(f"===== part {name}: {status} (rc {rc}) in {record['seconds']}s =====\n")
    log.flush()
    if status == "timeout":
        record["error"] = f"killed after {record['seconds']}s, its share of the budget"
    elif status == "error":
        with open(log.name, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
        said = [x for x in text.splitlines() if x.startswith(f"doctor part {name}: error:")]
        record["error"] = said[-1].split(": error: ", 1)[1] if said else f"exit code {rc}"
    return record


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit inside (so the running part is killed on the way out); the main
    thread only (elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_full(out: str | Path, budget: float, smoke: bool = False, device: str = "auto",
             parts: list[tuple[str, float]] | None = None, min_part_s: float = MIN_PART_S) -> dict:
    """Every part (``PARTS``, or ``parts``: (name or ``module:function``, share)) in turn under
    one deadline ``budget`` s away, each given its share of what is left (``_share``, at least
    ``min_part_s``); ``out``/run.log gets their output, and ``out``/summary.json, rewritten after
    every part, what each did. ``smoke``: every part on the CPU at tiny sizes, equal shares."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = parts or [(name, p.share) for name, p in PARTS.items()]
    if smoke:  # tiny sizes: every part costs about the same (start-up), whatever its share on a GPU
        parts = [(name, 1.0) for name, _ in parts]
    start = time.time()
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "budget_s": budget, "smoke": smoke,
                     "device": "cpu" if smoke else device, "parts": {}}
    with _sigterm_as_exit(), (out / "run.log").open("a", encoding="utf-8") as log:
        for i, (name, _) in enumerate(parts):
            left = start + budget - time.time()
            if left < 3:
                summary["parts"][name] = {"status": "skipped", "error": "no time left in the budget"}
            else:
                rec = _run_part(name, out, _share(left, parts, i, min_part_s), smoke, summary["device"], log)
                summary["parts"][name] = {**rec, **file_counts(out, name)}
            print(f"part {name:<4} {summary['parts'][name]['status']:<8} "
                  + json.dumps({k: v for k, v in summary["parts"][name].items() if k != "status"}), flush=True)
            summary["total_s"] = round(time.time() - start, 1)
            summary["ok"] = all(p["status"] == "ok" for p in summary["parts"].values())
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json and run.log ({summary['total_s']}s of {budget:.0f}s)")
    return summary
