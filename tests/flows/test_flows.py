"""Prefect flows against small real DVC repositories, under one session-scoped test harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

pytestmark = pytest.mark.usefixtures("harness")  # tests/flows/conftest.py


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


DVC = str(Path(sys.executable).parent / "dvc")
# the stage "hello": out.txt and a headline metrics file from train.times, after HELLO_SLEEP seconds
HELLO = ("import os, json, time, yaml; time.sleep(float(os.environ.get('HELLO_SLEEP', 0))); "
         "n = yaml.safe_load(open('params.yaml'))['train']['times']; open('out.txt', 'w').write('hi' * n); "
         "os.makedirs('reports/metrics/v', exist_ok=True); "
         "json.dump(dict(exact_ppl=n, nelbo_ppl=n), open('reports/metrics/v/likelihood.json', 'w'))")


def make_repo(tmp: Path, name: str = "repo") -> Path:
    """A git + DVC repository with one parameterised stage, committed (clean)."""
    repo = tmp / name
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True, env={"DVC_NO_ANALYTICS": "1", "PATH": ""})
    # a section of esolm's params (esolm report reads this file, and refuses unknown sections)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"times": 2}, "variants": {}}))
    stages = {"stages": {"hello": {"cmd": f'{sys.executable} -c "{HELLO}"', "params": ["train.times"],
                                   "outs": ["out.txt", "reports/metrics/v/likelihood.json"]},
                         "broken": {"cmd": f'{sys.executable} -c "raise SystemExit(3)"'}}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages))
    (repo / ".gitignore").write_text("out.txt\n/reports/\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    return repo


def worktrees(repo: Path) -> list[Path]:
    folder = repo / ".git" / "esolm-worktrees"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def untouched(repo: Path) -> None:
    """The checkout a flow was given: no file written, nothing changed, no worktree left."""
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert not (repo / "out.txt").exists() and not (repo / "dvc.lock").exists()
    assert worktrees(repo) == []
    assert _git(repo, "worktree", "list").count("\n") == 1


def test_pipeline_flow_runs_in_a_pinned_worktree_and_publishes_the_table(tmp_path):
    """The stages run in a worktree of HEAD sharing the checkout's DVC cache; the checkout is
    left as it was and the worktree removed."""
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path)
    table = pipeline(repo=str(repo), stages=["hello"])
    assert table.splitlines()[2].startswith("| v | 2 | 2 |")
    untouched(repo)
    assert any((repo / ".dvc" / "cache" / "files").rglob("*")), "the output is in the checkout's cache"
    assert any((repo / ".dvc" / "cache" / "runs").rglob("*")), "and so is the run cache"


def test_a_dirty_checkout_runs_its_commit_and_revision_pins_another(tmp_path):
    """Uncommitted edits are ignored (with a warning); ``revision`` runs an older commit."""
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path)
    first = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"times": 4}, "variants": {}}))
    _git(repo, "commit", "-qam", "four")
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"times": 7}, "variants": {}}))  # not committed
    assert "| v | 4 | 4 |" in pipeline(repo=str(repo), stages=["hello"])
    assert "| v | 2 | 2 |" in pipeline(repo=str(repo), stages=["hello"], revision=first)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["times"] == 7  # edits kept
    state = pipeline(repo=str(repo), stages=["hello"], revision="no-such-branch", return_state=True)
    assert state.is_failed() and "is no commit of" in str(state.message)


def test_a_failing_stage_fails_the_flow_and_keeps_its_worktree(tmp_path):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path)
    state = pipeline(repo=str(repo), stages=["broken"], return_state=True)
    assert state.is_failed()
    kept = worktrees(repo)
    assert len(kept) == 1 and (kept[0] / "dvc.yaml").is_file()  # kept for debugging


def test_experiment_flow_runs_overrides_in_a_worktree_and_ingests(tmp_path):
    from prefect.artifacts import Artifact

    from flows.experiment import experiment

    repo = make_repo(tmp_path)
    out = experiment(["train.times=3"], name="three", repo=str(repo), targets=["hello"])
    assert "ingested run" in out
    assert (repo / "reports" / "results.duckdb").exists()  # the checkout's results database
    assert "| v | 3 | 3 |" in Artifact.get("esolm-experiment").data
    assert _git(repo, "for-each-ref", "refs/exps").strip()  # dvc exp show sees it from the checkout
    (repo / "reports" / "results.duckdb").unlink()
    untouched(repo)


def test_two_flows_at_once_in_one_repository_each_publish_their_own_numbers(tmp_path, monkeypatch):
    """The tester's corruption: an experiment's `dvc exp run -S train.times=3` in the middle of a
    nightly. Each now runs in its own worktree: the nightly publishes the committed 2, the
    experiment its 3, and params.yaml of the checkout stays as committed."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect.artifacts import Artifact

    from flows.experiment import experiment
    from flows.pipeline import pipeline

    monkeypatch.setenv("HELLO_SLEEP", "2")  # both stages run at the same time
    repo = make_repo(tmp_path)
    params = (repo / "params.yaml").read_text()
    with ThreadPoolExecutor(2) as pool:
        nightly = pool.submit(pipeline, repo=str(repo), stages=["hello"])
        exp = pool.submit(experiment, ["train.times=3"], name="lr3", repo=str(repo), targets=["hello"],
                          db=str(tmp_path / "results.duckdb"))
        table, ingested = nightly.result(), exp.result()
    assert "| v | 2 | 2 |" in table
    assert "| v | 3 | 3 |" in Artifact.get("esolm-experiment").data and "ingested run" in ingested
    assert (repo / "params.yaml").read_text() == params
    untouched(repo)


def test_task_runs_are_named_after_what_they_do():
    from prefect._internal.engine import resolve_custom_task_run_name

    from tasks.stages import exp_run, ingest_and_report, pull_runs, push_runs, repro_stage, stage_tags

    def name(task, **parameters):
        return resolve_custom_task_run_name(task, parameters)

    assert name(repro_stage.with_options(tags=stage_tags("train")), stage="train", repo=".") == "repro train"
    assert name(push_runs, repo=".") == "dvc push"
    assert name(pull_runs, repo=".", targets=["train"]) == "dvc pull train"
    assert name(exp_run, overrides=["train.lr=0.003"], name=None) == "exp run train.lr=0.003"
    assert name(exp_run, overrides=["train.lr=0.003"], name="lr3") == "exp run lr3"
    assert name(ingest_and_report, label="pipeline") == "report pipeline"


def test_grid_overrides_and_task_logic_via_fn(tmp_path):
    from flows.experiment import grid_overrides
    from tasks.stages import repro_stage

    assert grid_overrides({"a": [1, 2], "b": ["x"]}) == [["a=1", "b=x"], ["a=2", "b=x"]]
    repo = make_repo(tmp_path)
    assert "hello" in repro_stage.fn("hello", str(repo))  # a task alone runs where it is told
    with pytest.raises(RuntimeError, match="failed"):
        repro_stage.fn("broken", str(repo))


def test_two_dvc_commands_on_one_checkout_wait_for_the_lock_instead_of_failing(tmp_path):
    """Two tasks run `dvc repro` in one checkout at the same time: DVC's repo lock makes the
    second wait (``--wait-for-lock``), and both succeed."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.stages import repro_stage

    repo = make_repo(tmp_path)
    slow = f'{sys.executable} -c "import time; time.sleep(3); open(\'slow.txt\', \'a\').write(\'x\')"'
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages["stages"]["slow"] = {"cmd": slow, "always_changed": True}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages))
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: repro_stage.fn("slow", str(repo)), range(2)))
    assert all("Running stage 'slow'" in out for out in outs)
    assert (repo / "slow.txt").read_text() == "xx"


def test_stage_tasks_carry_the_dvc_and_stage_tags():
    from tasks.stages import exp_run, pull_runs, push_runs, repro_stage, stage_tags

    assert stage_tags("train@eso_b_a05") == {"dvc", "stage:train"}
    assert all("dvc" in t.tags for t in (repro_stage, exp_run, push_runs, pull_runs))
    assert repro_stage.with_options(tags=stage_tags("train")).tags == {"dvc", "stage:train"}


def test_headline_markdown_reads_the_metrics_files_of_the_checkout(tmp_path):
    from tasks.stages import headline_markdown

    folder = tmp_path / "reports" / "metrics" / "ar"  # each stage's own file (esolm/headline.py)
    folder.mkdir(parents=True)
    (folder / "likelihood.json").write_text(json.dumps({"exact_ppl": 12.5, "nelbo_ppl": 13.0}))
    (folder / "sampling.json").write_text(json.dumps({"gen_ppl": 40.0, "s_per_sample": 0.01}))
    table = headline_markdown.fn(str(tmp_path))
    assert table.splitlines()[0] == "| variant | exact_ppl | nelbo_ppl | gen_ppl | s_per_sample |"
    assert table.splitlines()[2] == "| ar | 12.5 | 13 | 40 | 0.01 |"


def test_prefect_yaml_is_the_one_way_to_deploy_and_matches_the_flows():
    """One place deploys nightly (flows/deploy.py is gone); every deployment's parameters, and
    those the pipeline sends to the gpu deployment, are parameters of its flow."""
    import importlib
    import inspect

    from flows.pipeline import TRAINING_STAGES

    root = Path(__file__).resolve().parents[2]
    assert not (root / "flows" / "deploy.py").exists()
    deployments = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    assert [d["name"] for d in deployments if d.get("schedules")] == ["nightly"]
    for d in deployments:
        path, name = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(d.get("parameters", {})) <= accepted, d["name"]
        if d["name"] == "gpu":
            assert {"stage", "revision", "branch"} <= accepted
    assert set(TRAINING_STAGES) == {"train", "judge"}  # the judge is a training too
