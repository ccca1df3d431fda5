"""Training on several nodes, simulated on this machine: the run lock is per job (every rank of
one job shares it, a second job is refused) under torchrun, Lightning's launcher and SLURM; a
resume is all-or-nothing across ranks; a checkpoint of 2 devices resumes on 1 (issue #24)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esolm.io import job_key, job_lock

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env,key", [
    ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "3"}, "slurm:77"),
    ({"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}, "torchrun:abc"),
    ({"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}, "rendezvous:n0:29500"),
    ({"MASTER_ADDR": "n0", "MASTER_PORT": "29500", "NODE_RANK": "1"}, "rendezvous:n0:29500"),
    ({"ESOLM_JOB": "mine", "SLURM_JOB_ID": "77"}, "mine"),
])
def test_the_job_is_named_by_the_scheduler_or_the_rendezvous(monkeypatch, env, key):
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "ESOLM_JOB", "LSB_JOBID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert job_key() == key


def test_a_lone_process_names_itself_and_its_children_inherit_the_name(monkeypatch):
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "ESOLM_JOB", "LSB_JOBID"):
        monkeypatch.setenv(var, "x")  # recorded, so that teardown restores the environment
        monkeypatch.delenv(var)
    key = job_key(claim=True)
    assert key == f"process:{socket.gethostname()}:{os.getpid()}"
    assert os.environ["ESOLM_JOB"] == key  # Lightning's launcher copies the environment to its ranks


def test_every_rank_of_one_job_shares_the_lock_and_another_job_is_refused(tmp_path):
    folder = tmp_path / "runs" / "v" / "checkpoints"
    with job_lock(folder, "slurm:1", rank=0):
        with job_lock(folder, "slurm:1", rank=1, wait_s=2):  # a rank of the same job: never refused
            pass
        with pytest.raises(RuntimeError, match=r"in use by another esolm train job \(slurm:1\)"), \
                job_lock(folder, "slurm:2", rank=0):  # a second job's rank 0
            pass
        with pytest.raises(RuntimeError, match=r"held by job slurm:1, not this job \(slurm:2\)"), \
                job_lock(folder, "slurm:2", rank=3, wait_s=0.5):  # a second job's other ranks stop too
            pass
    with job_lock(folder, "slurm:2", rank=0):  # released: the next job takes it
        pass


def test_the_ranks_train_together_only_when_they_share_the_run_and_its_resume_point(tmp_path):
    from esolm.lit import disagreement

    job, folder = "slurm:5", tmp_path / "runs" / "v" / "checkpoints"
    assert disagreement([(None, job), (None, job)], job, folder) is None
    assert disagreement([((4, "ab12"), job)] * 3, job, folder) is None
    apart = disagreement([(None, job), (None, None), (None, "slurm:4")], job, folder)
    assert apart.startswith("ranks 1,2 of job slurm:5 do not see its lock in") and "separate checkouts" in apart
    torn = disagreement([((4, "ab12"), job), (None, job), ((4, "ab12"), job)], job, folder)
    assert torn.startswith("the ranks disagree on where to resume: ranks 0,2 step 4 (ab12), rank 1 from scratch")


WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from esolm.config import ModelConfig
    from esolm.data import read_meta
    from esolm.train_config import TrainConfig
    from esolm.training import train

    shards, run, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cfg = ModelConfig(family="ar", vocab_size=read_meta(shards)["vocab_size"], length=16, d_model=32, n_layers=2,
                      n_heads=4, cond_dim=32)
    tc = TrainConfig(steps=steps, batch_size=8, val_every=4, val_batches=1, ckpt_every=4, log_every=2, lr=3e-3,
                     warmup_steps=2, devices=1, num_nodes=int(os.environ.get("NODES", "1")),
                     strategy="ddp" if os.environ.get("NODES", "1") != "1" else "auto", accelerator="cpu")
    try:
        summary = train(cfg, tc, shards, run, progress=False)
        print(json.dumps({{"steps": summary["steps"]}}))
    except Exception as err:
        print(f"ERROR {{type(err).__name__}}: {{err}}", file=sys.stderr)
        sys.exit(3)
""")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from esolm.data import DataConfig, prepare
    from tests.data.conftest import write_txt_corpus

    tmp = tmp_path_factory.mktemp("nodes")
    corpus = write_txt_corpus(tmp / "docs", n_docs=40)
    return prepare(DataConfig(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer="bpe:300", length=16,
                              out_dir=str(tmp / "out"), cache_dir=str(tmp / "raw")), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(tmp_path: Path, shards: Path, runs: list[Path], steps: int,
           scheduler: str) -> list[subprocess.CompletedProcess]:
    """Two single-process "nodes" of one job on this machine (gloo), as Lightning's launcher
    (MASTER_ADDR, NODE_RANK) or SLURM (SLURM_PROCID, SLURM_NTASKS, ... and no LOCAL_RANK) start them."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    port = _free_port()
    procs = []
    for rank, run in enumerate(runs):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "ESOLM_JOB"))}
        env.update(NODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", PYTHONPATH=str(ROOT),
                   ESOLM_LOCK_WAIT_S="5")
        if scheduler == "slurm":
            env.update(SLURM_JOB_ID="4242", SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_NODEID=str(rank),
                       SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="esolm", SLURM_NNODES="2")
        else:
            env.update(NODE_RANK=str(rank), LOCAL_RANK="0")
        procs.append(subprocess.Popen([sys.executable, str(script), str(shards), str(run), str(steps)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("scheduler", ["lightning", "slurm"])
def test_two_nodes_in_one_checkout_train_and_resume(shards, tmp_path, scheduler):
    """Used to: one node stopped with "in use by another esolm train process", the other hung."""
    run = tmp_path / "runs" / "ar"
    done = _nodes(tmp_path, shards, [run, run], 4, scheduler)
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-800:] for p in done]
    assert json.loads(done[0].stdout.strip().splitlines()[-1]) == {"steps": 4}
    more = _nodes(tmp_path, shards, [run, run], 8, scheduler)  # both resume from the shared step 4
    assert [p.returncode for p in more] == [0, 0], [p.stderr[-800:] for p in more]
    rows = [json.loads(r) for r in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]


def test_two_nodes_in_separate_checkouts_are_refused_together(shards, tmp_path):
    """Used to: a fresh run trained, then a resume had node 0 train steps 4-7 beside node 1's
    steps 0-3, write a wrong last.ckpt and hang. Now every rank stops at once, nothing trained."""
    first, second = tmp_path / "one" / "runs" / "ar", tmp_path / "two" / "runs" / "ar"
    done = _nodes(tmp_path, shards, [first, second], 4, "lightning")
    assert [p.returncode for p in done] == [3, 3], [p.stderr[-800:] for p in done]
    for p in done:
        line = [ln for ln in p.stderr.splitlines() if ln.startswith("ERROR")][-1]
        assert "rank 1 of job rendezvous:127.0.0.1:" in line and "separate checkouts is not supported" in line
    assert not (first / "checkpoints" / "last.ckpt").exists() and not (second / "model.ckpt").exists()


def test_a_checkpoint_of_two_devices_resumes_on_one(shards, tmp_path):
    """The device count, nodes, strategy and micro-batch are not in the run's fingerprint: the
    global batch and the data order are the same (tests/test_training.py checks the losses)."""
    from dataclasses import replace

    from esolm.config import ModelConfig
    from esolm.data import read_meta
    from esolm.train_config import TrainConfig
    from esolm.training import fingerprint

    cfg = ModelConfig(family="ar", vocab_size=read_meta(shards)["vocab_size"], length=16, d_model=32, n_layers=2,
                      n_heads=4, cond_dim=32)
    one = TrainConfig(batch_size=8)
    same = [replace(one, devices=2), replace(one, devices=2, num_nodes=2, strategy="ddp"),
            replace(one, micro_batch_size=4), replace(one, accelerator="cpu")]
    assert all(fingerprint(cfg, tc, shards) == fingerprint(cfg, one, shards) for tc in same)
    assert fingerprint(cfg, replace(one, batch_size=16), shards) != fingerprint(cfg, one, shards)
