"""Prefect flows against small real DVC repositories, under one session-scoped test harness."""

from __future__ import annotations

import json
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
    # a section of esolm's params (esolm report reads this file, and refuses unknown sections)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"times": 2}, "variants": {}}))
    write = ("import yaml; n = yaml.safe_load(open('params.yaml'))['train']['times']; "
             "open('out.txt', 'w').write('hi' * n)")
    stages = {"stages": {"hello": {"cmd": f'{sys.executable} -c "{write}"', "params": ["train.times"],
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
    out = experiment(["train.times=3"], name="three", repo=str(repo), targets=["hello"])
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from tests.conftest import trained_project

    return trained_project(tmp_path_factory.mktemp("trained"))


@pytest.mark.slow  # 4 esolm processes and a tiny training: about a minute on 2 idle cores
def test_schedule_search_flow_runs_exactly_n_trials_across_its_workers(trained):
    """The old flow asked 2 workers for 3 trials each and ran 9; now the study holds exactly n."""
    import optuna

    from flows.search import schedule_search

    out = schedule_search(repo=str(trained), workers=2, n_trials=5)
    assert out["queued"] == 5 and out["ran"] == 5
    names = optuna.get_all_study_names(f"sqlite:///{trained / 'reports/search/study.db'}")
    assert len(names) == 1 and names[0].startswith("schedule-eso_b_a05-")
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{trained / 'reports/search/study.db'}")
    assert len(study.trials) == 5 and {t.state.name for t in study.trials} == {"COMPLETE"}
    assert "5 trials (0 new)" in out["summary"]
    assert (trained / "reports" / "search" / "pareto.json").exists()
