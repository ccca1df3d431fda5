"""The GPU pool hands its results back: real git and DVC, a bare git remote and a folder as DVC
remote, two clones (two "machines"), the remote deployment replaced by a direct call of the
stage flow in the other clone. The committed dvc.lock matches params.yaml, and its outputs are
nowhere to be pulled (the committed repository's normal state): before, the CPU side then
trained again what the GPU side had trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from tests.flows.test_flows import DVC, _git

pytestmark = pytest.mark.usefixtures("harness")  # tests/flows/conftest.py

# "training": a model and a git-tracked curve that differ at every run (like training on another machine), and a line
# per run in a log outside the repositories, naming the folder it ran in
TRAIN = ("import os, sys, uuid, yaml; n = yaml.safe_load(open('params.yaml'))['train']['times']; "
         "open('model.txt', 'w').write(uuid.uuid4().hex * n); open('curve.csv', 'w').write(uuid.uuid4().hex); "
         "open(sys.argv[1], 'a').write(os.getcwd() + chr(10))")
EVALUATE = ("import json, os; m = open('model.txt').read(); os.makedirs('reports/metrics/v', exist_ok=True); "
            "json.dump(dict(exact_ppl=len(m), nelbo_ppl=len(m)), open('reports/metrics/v/likelihood.json', 'w'))")


def dvc(repo: Path, *args: str) -> str:
    return subprocess.run([DVC, *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={"DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}).stdout


def two_machines(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """(cpu clone, gpu clone, bare git remote, training log): a committed study whose dvc.lock
    matches params.yaml, with a DVC remote that holds none of its outputs."""
    seed, origin, log = tmp / "seed", tmp / "origin.git", tmp / "trained.log"
    seed.mkdir()
    _git(seed, "init", "-q")
    _git(seed, "config", "user.email", "t@example.org")
    _git(seed, "config", "user.name", "t")
    dvc(seed, "init", "-q")
    dvc(seed, "remote", "add", "-d", "shared", str(tmp / "dvc-remote"))
    (seed / "params.yaml").write_text(yaml.safe_dump({"train": {"times": 2}, "variants": {}}))
    stages = {"stages": {
        "train": {"cmd": f'{sys.executable} -c "{TRAIN}" {log}', "params": ["train.times"],
                  "outs": ["model.txt", {"curve.csv": {"cache": False}}]},  # committed, like reports/curves
        "evaluate": {"cmd": f'{sys.executable} -c "{EVALUATE}"', "deps": ["model.txt"],
                     "outs": ["reports/metrics/v/likelihood.json"]}}}
    (seed / "dvc.yaml").write_text(yaml.safe_dump(stages))
    dvc(seed, "repro")
    _git(seed, "add", "-A")
    _git(seed, "commit", "-qm", "a trained study (its outputs never pushed)")
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(origin)], check=True)
    log.unlink()
    cpu, gpu = tmp / "cpu", tmp / "gpu"
    for clone in (cpu, gpu):
        subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
        _git(clone, "config", "user.email", "t@example.org")
        _git(clone, "config", "user.name", "t")
    assert "up to date" in dvc(cpu, "status") or "changed outs" in dvc(cpu, "status")  # lock == params
    return cpu, gpu, origin, log


def test_what_the_gpu_pool_trains_reaches_the_cpu_side_without_training_again(tmp_path, monkeypatch):
    import flows.pipeline as pipeline_module
    from flows.stage import stage

    cpu, gpu, origin, log = two_machines(tmp_path)
    sent = []

    def remote(deployment: str, name: str, revision: str, branch: str) -> None:  # the gpu worker
        sent.append((deployment, name))
        stage(stage=name, repo=str(gpu), revision=revision, branch=branch)

    monkeypatch.setattr(pipeline_module, "run_remote_stage", remote)
    table = pipeline_module.pipeline(repo=str(cpu), stages=["train", "evaluate"], gpu_deployment="esolm-stage/gpu")
    assert sent == [("esolm-stage/gpu", "train")]
    trained = log.read_text().splitlines()
    assert len(trained) == 1 and f"{gpu}/.git/esolm-worktrees/stage-train-" in trained[0]  # once, there
    assert "| v | 64 | 64 |" in table  # evaluated on the CPU side from the GPU's model (2 x 32 hex)
    assert _git(origin, "for-each-ref", "refs/heads/esolm-handover").strip() == ""  # branch cleaned up
    for clone in (cpu, gpu):
        assert _git(clone, "status", "--porcelain") == ""  # both checkouts untouched, no worktree left
        left = clone / ".git" / "esolm-worktrees"
        assert not left.exists() or not any(left.iterdir())


def test_merge_lock_takes_only_the_stages_the_other_side_changed(tmp_path):
    """The plumbing alone: a branch whose dvc.lock changed `train` (and not `evaluate`) merged
    into a worktree whose own lock changed `evaluate`: both changes kept."""
    from tasks.workspace import commit_lock, git, merge_lock

    cpu, gpu, _origin, _log = two_machines(tmp_path)
    base = git(cpu, "rev-parse", "HEAD")
    lock = yaml.safe_load((gpu / "dvc.lock").read_text())
    lock["stages"]["train"]["outs"][0]["md5"] = "0" * 32
    (gpu / "dvc.lock").write_text(yaml.safe_dump(lock))
    commit_lock(gpu, "esolm-handover/x/train", "origin")
    mine = yaml.safe_load((cpu / "dvc.lock").read_text())
    mine["stages"]["evaluate"]["outs"][0]["md5"] = "1" * 32
    (cpu / "dvc.lock").write_text(yaml.safe_dump(mine))
    assert merge_lock(cpu, "esolm-handover/x/train", "origin", base) == ["train"]
    merged = yaml.safe_load((cpu / "dvc.lock").read_text())["stages"]
    assert merged["train"]["outs"][0]["md5"] == "0" * 32 and merged["evaluate"]["outs"][0]["md5"] == "1" * 32
