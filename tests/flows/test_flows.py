"""Prefect flows against small real DVC repositories, under one session-scoped test harness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from prefect import task
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def harness(tmp_path_factory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def make_repo(tmp: Path) -> Path:
    """A git + DVC repository with one parameterised stage."""
    repo = tmp / "repo"
    repo.mkdir()
    dvc = str(Path(sys.executable).parent / "dvc")
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env={"DVC_NO_ANALYTICS": "1", "PATH": ""})
    (repo / "params.yaml").write_text(yaml.safe_dump({"hello": {"times": 2}, "variants": {}}))
    write = ("import yaml; n = yaml.safe_load(open('params.yaml'))['hello']['times']; "
             "open('out.txt', 'w').write('hi' * n)")
    stages = {"stages": {"hello": {"cmd": f'{sys.executable} -c "{write}"', "params": ["hello.times"],
                                   "outs": [{"out.txt": {"cache": False}}]},
                         "broken": {"cmd": f'{sys.executable} -c "raise SystemExit(3)"'}}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages))
    (repo / ".gitignore").write_text("out.txt\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    return repo


def test_pipeline_flow_runs_stages_in_order_and_publishes_the_table(tmp_path, monkeypatch):
    import flows.pipeline as pipeline_module

    @task
    def fake_headline(repo: str) -> str:
        return "| variant | ppl |\n|---|---|\n| ar | 1.0 |"

    monkeypatch.setattr(pipeline_module, "headline_markdown", fake_headline)
    repo = make_repo(tmp_path)
    table = pipeline_module.pipeline(repo=str(repo), stages=["hello"])
    assert (repo / "out.txt").read_text() == "hihi"
    assert (repo / "dvc.lock").exists()
    assert "| ar | 1.0 |" in table


def test_a_failing_stage_fails_the_flow_after_its_retry(tmp_path):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path)
    state = pipeline(repo=str(repo), stages=["broken"], return_state=True)
    assert state.is_failed()


def test_experiment_flow_runs_overrides_as_a_dvc_experiment_and_ingests(tmp_path):
    from flows.experiment import experiment

    repo = make_repo(tmp_path)
    out = experiment(["hello.times=3"], name="three", repo=str(repo), targets=["hello"])
    assert (repo / "out.txt").read_text() == "hihihi"
    assert "ingested run" in out
    assert (repo / "reports" / "results.duckdb").exists()


def test_grid_overrides_and_task_logic_via_fn(tmp_path):
    from flows.experiment import grid_overrides
    from tasks.stages import repro_stage

    assert grid_overrides({"a": [1, 2], "b": ["x"]}) == [["a=1", "b=x"], ["a=2", "b=x"]]
    repo = make_repo(tmp_path)
    assert "hello" in repro_stage.fn("hello", str(repo))
    with pytest.raises(RuntimeError, match="failed"):
        repro_stage.fn("broken", str(repo))
