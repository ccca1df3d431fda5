"""Tasks that drive DVC and the results store. They pass paths and small dicts only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import task

OFFLINE_ENV = {"DVC_NO_ANALYTICS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "MPLBACKEND": "Agg"}


def _bin(name: str) -> str:
    """The executable of this environment (the venv's dvc / esolm), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def run_command(args: list[str], repo: str) -> str:
    """Run a command in ``repo`` with the venv's bin first on PATH; raise with its output on failure."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return proc.stdout


@task(retries=1, retry_delay_seconds=5, log_prints=True)
def repro_stage(stage: str, repo: str = ".") -> str:
    """`dvc repro STAGE` (a stage or a foreach group); unchanged stages are skipped by DVC."""
    out = run_command([_bin("dvc"), "repro", stage], repo)
    print(f"dvc repro {stage}:\n{out[-2000:]}")
    return out


@task(log_prints=True)
def exp_run(overrides: list[str], repo: str = ".", name: str | None = None, queue: bool = False,
            targets: list[str] | None = None) -> str:
    """`dvc exp run -S key=value ... [targets]` (or only queue it)."""
    args = [_bin("dvc"), "exp", "run", *(targets or [])] + [a for o in overrides for a in ("-S", o)]
    if name:
        args += ["--name", name]
    if queue:
        args.append("--queue")
    return run_command(args, repo)


@task(log_prints=True)
def run_queue(repo: str = ".", jobs: int = 1) -> str:
    return run_command([_bin("dvc"), "exp", "run", "--run-all", "--jobs", str(jobs)], repo)


@task(log_prints=True)
def apply_experiment(name: str, repo: str = ".") -> str:
    return run_command([_bin("dvc"), "exp", "apply", name], repo)


@task(log_prints=True)
def ingest_and_report(repo: str = ".", label: str = "pipeline") -> str:
    """`esolm report`: ingest the run's files into DuckDB (one writer) and write the report."""
    return run_command([_bin("esolm"), "report", "--label", label], repo)


@task
def headline_markdown(repo: str = ".") -> str:
    """The headline table of the newest ingested run, as markdown."""
    from esolm.params import load_params
    from esolm.report import headline, markdown_table
    from esolm.store import run_id

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        cols, rows = headline(Path("reports/results.duckdb"), run_id(load_params("params.yaml")))
    finally:
        os.chdir(cwd)
    return markdown_table(cols, rows)
