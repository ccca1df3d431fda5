"""Atomic file writes and safe checkpoint loading: the one home of both."""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (unique to this process and call); rename it to
    ``path`` only if the block succeeds, else remove it: ``path`` is the old file or the new
    one, never a mix. A full disk is reported as such, naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; the previous version "
                                        "(if any) is intact: free space and run again") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a scratch folder named after a dead one is a leftover of a
    killed run (SIGKILL runs no clean-up), which the next run removes."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextmanager
def run_lock(folder: str | Path, what: str = "esolm") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file inside it) for one writer: a second
    process asking for it stops at once with a message instead of interleaving writes. The
    lock goes with the process (no stale lock after a kill)."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{folder} is in use by another {what} process; wait for it to "
                               "finish (or stop it) and run again") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


JOB_VARIABLES = (("SLURM_JOB_ID", "slurm"), ("TORCHELASTIC_RUN_ID", "torchrun"), ("LSB_JOBID", "lsf"))


def job_key(claim: bool = False) -> str:
    """The name of the job this process belongs to, the same in every rank of it: ``ESOLM_JOB``
    (set by the job's first process for the ranks it starts), else the scheduler's job id (SLURM,
    torchrun's rendezvous id, LSF), else the rendezvous address (``MASTER_ADDR:MASTER_PORT``, as
    Lightning's multi-node launch and torchrun set it), else this process. ``claim``: put the name
    in this process's environment, so that ranks it starts (Lightning's launcher) inherit it."""
    import socket

    key = os.environ.get("ESOLM_JOB")
    for var, tag in JOB_VARIABLES:
        if key is None and os.environ.get(var) not in (None, "", "none"):
            key = f"{tag}:{os.environ[var]}"
    if key is None and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        key = f"rendezvous:{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    key = key or f"process:{socket.gethostname()}:{os.getpid()}"
    if claim:
        os.environ["ESOLM_JOB"] = key
    return key


@contextmanager
def job_lock(folder: str | Path, job: str, rank: int, what: str = "esolm train",
             wait_s: float | None = None) -> Iterator[None]:
    """Exclusive use of ``folder`` by one job: its global rank 0 holds the folder's lock
    (``run_lock``) and names the job in ``.lock.job``; every other rank of the job waits (up to
    ``wait_s``, default ``ESOLM_LOCK_WAIT_S`` or 30 s) for that file to name its own job. So the
    ranks of one job never refuse each other (on any node, under torchrun, Lightning's launcher
    or SLURM), and every rank of a second job stops with one line instead of hanging. A rank that
    never sees the file (its own, unshared, run folder) goes on: ``lit.LitModel.setup`` then
    stops every rank of the job together (``owner_of`` tells what each rank saw)."""
    import time

    folder = Path(folder)
    owner = folder / ".lock.job"
    if rank == 0:
        try:
            with run_lock(folder, what):
                write_text_atomic(owner, job + "\n")
                try:
                    yield
                finally:
                    owner.unlink(missing_ok=True)
        except RuntimeError as err:
            if "in use by another" not in str(err):
                raise
            held = owner.read_text().strip() if owner.is_file() else "unknown"
            raise RuntimeError(f"{folder} is in use by another {what} job ({held}); this job is {job}: "
                               "wait for it to finish (or stop it) and run again") from None
        return
    wait_s = float(os.environ.get("ESOLM_LOCK_WAIT_S", "30")) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while (seen := owner_of(folder)) != job and time.monotonic() < deadline:
        time.sleep(0.1)
    if seen is not None and seen != job:
        raise RuntimeError(f"rank {rank}: {folder} is held by job {seen}, not this job ({job}): wait for "
                           "it to finish (or stop it) and run again")
    yield


def owner_of(folder: str | Path) -> str | None:
    """The job named in ``folder``'s ``.lock.job`` (``job_lock``), or None."""
    path = Path(folder) / ".lock.job"
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when it does not exist). A partial last line (a process
    killed while appending) is dropped with a note; a bad line elsewhere names file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):
                print(f"{path}: dropped a partial last line {i} (an interrupted write)")
                break
            raise ValueError(f"{path} line {i} is not JSON ({err.msg}); fix or delete the line") from err
    return rows


def write_json(path: str | Path, obj: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save through ``atomic_path``: the previous checkpoint survives any failure."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def remake(path: Path) -> str:
    """What writes a model file or checkpoint again: the training state ``runs/V/checkpoints/
    last.ckpt`` is dropped by --fresh; ``runs/V/model.ckpt`` is rewritten by its stage."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        name = path.parent.parent.name
        verb = "judge" if name == "judge" else f"train --variant {name}"
        return f"delete it or train from scratch with --fresh (esolm {verb} --fresh)"
    if path.name == "model.ckpt":
        name = path.parent.name
        if name == "judge":
            return "rerun the stage that writes it: dvc repro -f judge (or esolm judge)"
        return f"rerun the stage that writes it: dvc repro -f train@{name} (or esolm train --variant {name})"
    return "replace it with a complete copy"


def safe_load(path: Path, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True and a clear error for missing, truncated or foreign
    files: one line naming the file and how to write it again."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); it is "
                         f"truncated, corrupt or not an esolm/Lightning checkpoint: {remake(path)}") from err
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like the others
            f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj
