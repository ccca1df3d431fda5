"""prefect.yaml on a real Prefect server: a process work pool, a worker, a deployment of a
reduced pipeline; the flow run completes in a worktree of the worker's checkout and publishes
its artifact; training goes to a second pool's worker in another checkout and comes back
(slow: 3-6 minutes)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.data.conftest import write_txt_corpus
from tests.test_pipeline_e2e import tiny_params

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, api: str, repo: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(repo),
            "PREFECT_HOME": str(tmp / "prefect_home"), "PREFECT_API_URL": api, "ESOLM_REPO": str(repo),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
            "PREFECT_SERVER_API_HOST": "127.0.0.1"}


def _start(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"prefect server not healthy after {seconds}s:\n{log.read_text()[-3000:]}")


def _cli(args: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, f"prefect {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]


def _tiny_repo(tmp: Path) -> Path:
    """A clone of this repository with the tiny study committed (flows run commits, not edits)
    and a bare clone of it as ``origin`` (the hand-over branches go there, never to ROOT)."""
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    for folder in ("flows", "tasks"):  # the flows as they are here, committed or not: the ones under test
        shutil.rmtree(repo / folder)
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "prefect.yaml", repo / "prefect.yaml")
    tiny_params(repo, write_txt_corpus(tmp / "docs", n_docs=40))
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["variants"] = {"ar": {"family": "ar"}}
    p["search"]["variant"] = "ar"
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    subprocess.run(["git", "add", "-A", "flows", "tasks", "prefect.yaml", "params.yaml"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "tiny study"], cwd=repo, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(tmp / "origin.git")], check=True)
    subprocess.run(["git", "remote", "set-url", "origin", str(tmp / "origin.git")], cwd=repo, check=True)
    return repo


def _untouched(repo: Path) -> None:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == "", status
    assert not (repo / "runs").exists() and not (repo / "data" / "processed").exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port; yields (API URL, its folder)."""
    tmp = tmp_path_factory.mktemp("prefect_server")
    api = f"http://127.0.0.1:{_free_port()}/api"
    port = api.split(":")[2].split("/")[0]
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                  _env(tmp, api, tmp), tmp, tmp / "server.log")
    try:
        _wait_healthy(api, proc, tmp / "server.log")
        yield api, tmp
    finally:
        _stop(proc)


def _run_deployment(api: str, name: str, parameters: dict, worker: subprocess.Popen, log: Path) -> str:
    deployment = httpx.get(f"{api}/deployments/name/{name}").json()
    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run",
                     json={"parameters": parameters}).json()
    state = _wait_for_run(api, run["id"], worker, log)
    assert state == "COMPLETED", log.read_text()[-4000:]
    return run["id"]


def _artifact(api: str, run_id: str, key: str) -> dict:
    artifacts = httpx.post(f"{api}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    found = [a for a in artifacts if a["key"] == key]
    assert len(found) == 1, artifacts
    return found[0]


@pytest.mark.slow
def test_a_worker_on_the_process_pool_runs_the_deployed_pipeline(tmp_path, server):
    api, home = server
    repo = _tiny_repo(tmp_path)
    env = _env(home, api, repo)
    _cli(["work-pool", "create", "esolm-cpu", "--type", "process"], env, repo)
    _cli(["concurrency-limit", "create", "dvc", "1"], env, repo)
    _cli(["--no-prompt", "deploy", "--name", "nightly"], env, repo)
    assert httpx.get(f"{api}/deployments/name/esolm-pipeline/nightly").json()["work_pool_name"] == "esolm-cpu"
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", "esolm-cpu", "--limit", "1"],
                    env, repo, tmp_path / "worker.log")
    try:
        run_id = _run_deployment(api, "esolm-pipeline/nightly", {"stages": ["prepare", "train", "evaluate"]},
                                 worker, tmp_path / "worker.log")
    finally:
        _stop(worker)
    assert "| ar |" in _artifact(api, run_id, "esolm-headline")["data"]
    _untouched(repo)  # everything happened in the run's worktree, now removed


@pytest.mark.slow
def test_training_is_sent_to_the_gpu_pool_and_restored_from_the_run_cache(tmp_path, server):
    """Two checkouts (two "machines") share a DVC remote and a git remote; the CPU pool's
    pipeline sends `train` to the `gpu` pool's worker, which trains in a worktree of its own
    checkout at the pipeline's commit, pushes the model and hands its dvc.lock back on a branch;
    the pipeline merges it and fetches the trained model instead of training."""
    api, home = server
    cpu = _tiny_repo(tmp_path)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(tmp_path / "remote")], cwd=cpu,
                   check=True, capture_output=True)
    subprocess.run([*GIT, "commit", "-qam", "tiny study with a remote"], cwd=cpu, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD"], cwd=cpu, check=True)
    gpu = tmp_path / "gpu_checkout"
    subprocess.run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(gpu)], check=True)
    cpu_env, gpu_env = _env(home, api, cpu), _env(home, api, gpu)
    for pool in ("esolm-cpu", "gpu"):
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], cwd=cpu,
                       env=cpu_env, capture_output=True, check=False)  # the other test may have made it
    _cli(["--no-prompt", "deploy", "--name", "nightly-gpu", "--name", "gpu"], cpu_env, cpu)
    workers = [_start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"], env, repo,
                      tmp_path / f"{pool}.log")
               for pool, env, repo in (("esolm-cpu", cpu_env, cpu), ("gpu", gpu_env, gpu))]
    try:
        run_id = _run_deployment(api, "esolm-pipeline/nightly-gpu", {"stages": ["prepare", "train", "evaluate"]},
                                 workers[0], tmp_path / "esolm-cpu.log")
    finally:
        for w in workers:
            _stop(w)
    cpu_log, gpu_log = (tmp_path / "esolm-cpu.log").read_text(), (tmp_path / "gpu.log").read_text()
    assert "Running stage 'train@ar'" in gpu_log  # trained there
    assert "Running stage 'train@ar'" not in cpu_log and "Pulling data for" in cpu_log  # fetched here
    assert "took 1 stage(s)" in cpu_log or "took 2 stage(s)" in cpu_log  # the handed-back dvc.lock
    assert "| ar |" in _artifact(api, run_id, "esolm-headline")["data"]
    for checkout in (cpu, gpu):
        _untouched(checkout)


def _wait_for_run(api: str, run_id: str, worker: subprocess.Popen, log: Path, seconds: float = 900) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        assert worker.poll() is None, f"worker exited:\n{log.read_text()[-3000:]}"
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} not finished after {seconds}s:\n{log.read_text()[-3000:]}")
