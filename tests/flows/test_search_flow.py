"""The schedule-search flow in a pinned worktree (issue #25): a checkout's files untouched, its
commit run, one study extended run after run, the inputs from the DVC cache or one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from tests.flows.test_flows import DVC, _git, worktrees

pytestmark = pytest.mark.usefixtures("harness")  # tests/flows/conftest.py

ROOT = Path(__file__).resolve().parents[2]


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return subprocess.run([DVC, *args], cwd=repo, check=True, capture_output=True, text=True, env=env).stdout


def _init(repo: Path) -> None:
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    _dvc(repo, "init", "-q")
    for name in (".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)


def search_checkout(trained: Path, tmp: Path) -> Path:
    """A git + DVC checkout of the trained project, as after `dvc repro train@eso_b_a05 judge` and
    a commit: params.yaml, dvc.yaml and the code (this tree's esolm: the pinned code the worktree
    runs) committed, with a dvc.lock recording the prepared data and the two models, which are in
    the DVC cache and in place."""
    repo = tmp / "checkout"
    repo.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(trained / name, repo / name)
    for folder in ("data/processed", "runs/eso_b_a05", "runs/judge", "reports"):
        shutil.copytree(trained / folder, repo / folder, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(ROOT / "esolm", repo / "esolm", ignore=shutil.ignore_patterns("__pycache__"))
    _init(repo)
    _dvc(repo, "commit", "-f", "prepare", "train@eso_b_a05", "judge")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a trained study")
    return repo


def snapshot(repo: Path) -> dict[str, str]:
    """sha256 of every file of the checkout (tracked or not: runs/, data/, reports/), but git's
    and DVC's own folders and the study file the flow is meant to extend."""
    skip = (".git/", ".dvc/cache/", ".dvc/tmp/", "reports/search-study.db")
    files = [p for p in repo.rglob("*") if p.is_file() and not p.relative_to(repo).as_posix().startswith(skip)]
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from tests.conftest import trained_project

    return trained_project(tmp_path_factory.mktemp("trained"))


@pytest.mark.slow  # a tiny training, then 2 flow runs of 4 and 3 esolm processes: about 1.5 minutes on 2 cores
def test_the_search_flow_runs_its_commit_in_a_worktree_and_extends_the_checkouts_study(trained, tmp_path):
    """Before: the flow ran `esolm search` in the checkout itself, so it wrote reports/search/ (the
    search stage's DVC outputs) there and ran uncommitted edits. Now the checkout's files are
    byte-identical after two runs of its commit (an uncommitted edit of params.yaml ignored), the
    study lives in the checkout's reports/search-study.db, the second run with a larger n_trials
    adds only the missing trial, and the artifact names the chosen schedule."""
    import optuna
    from prefect.artifacts import Artifact

    from flows.search import schedule_search
    from tasks.workspace import dirty_files

    repo = search_checkout(trained, tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["search"]["num_samples"] = 3  # not committed: another study (its key hashes num_samples)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert dirty_files(repo) == ["params.yaml"]  # what the flow's warning names
    before = snapshot(repo)

    out = schedule_search(repo=str(repo), workers=2, n_trials=3)
    assert out["queued"] == 3 and out["ran"] == 3 and "3 trials (0 new)" in out["summary"]
    assert snapshot(repo) == before and worktrees(repo) == []
    storage = f"sqlite:///{repo / 'reports' / 'search-study.db'}"
    assert out["storage"] == storage and out["commit"] == _git(repo, "rev-parse", "HEAD").strip()
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1 and names[0].startswith("schedule-eso_b_a05-")
    study = optuna.load_study(study_name=names[0], storage=storage)
    assert study.user_attrs["scoring"]["num_samples"] == 2  # the commit's, not the edit's 3
    first = study.trials
    assert [t.state.name for t in first] == ["COMPLETE"] * 3
    best = out["best"]
    artifact = Artifact.get("esolm-search").data
    assert best["trial"] in range(3) and f"trial {best['trial']}:" in artifact
    assert json.dumps(best["searched"], sort_keys=True) in artifact
    assert out["commit"] in artifact and storage in artifact and "## Pareto front" in artifact

    again = schedule_search(repo=str(repo), workers=1, n_trials=4)
    assert again["queued"] == 1 and again["ran"] == 1 and "4 trials (0 new)" in again["summary"]
    assert optuna.get_all_study_names(storage) == names
    trials = optuna.load_study(study_name=names[0], storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and {t.state.name for t in trials} == {"COMPLETE"}
    assert [(t.params, t.datetime_start) for t in trials[:3]] == [(t.params, t.datetime_start) for t in first]
    assert snapshot(repo) == before and worktrees(repo) == []


STAGES = {"stages": {  # the stages whose outputs the search reads, with the pipeline's names and paths
    "prepare": {"cmd": "true", "outs": ["data/processed"]},
    "train": {"foreach": "${variants}", "do": {"cmd": "true", "outs": ["runs/${key}/model.ckpt"]}},
    "judge": {"cmd": "true", "outs": ["runs/${judge.name}/model.ckpt"]}}}


def test_a_model_no_cache_or_remote_holds_is_one_line_naming_the_stage_to_run(tmp_path):
    """The commit's dvc.lock records no model, then records them but the cache lost them (and no
    remote is configured): each time one line naming what is missing and `dvc repro
    train@eso_b_a05 judge`, before any `esolm search` runs."""
    from flows.search import schedule_search

    repo = tmp_path / "checkout"
    repo.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["variants"] = {"eso_b_a05": {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}}
    params["search"]["variant"] = "eso_b_a05"
    params["data"]["dataset"] = "tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(STAGES))
    _init(repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "never ran")
    state = schedule_search(repo=str(repo), return_state=True)
    assert state.is_failed()
    line = str(state.message)
    assert "\n" not in line and "records no runs/eso_b_a05/model.ckpt, runs/judge/model.ckpt" in line
    assert "run `dvc repro train@eso_b_a05 judge` in the checkout and commit dvc.lock" in line

    for path in ("runs/eso_b_a05/model.ckpt", "runs/judge/model.ckpt", "data/processed/tiny/meta.json",
                 "data/processed/tiny/valid.bin"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(path)
    _dvc(repo, "commit", "-f")
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-qm", "ran elsewhere")
    shutil.rmtree(repo / ".dvc" / "cache" / "files" / "md5")
    line = str(schedule_search(repo=str(repo), return_state=True).message)
    assert "\n" not in line and "in neither the DVC cache nor a DVC remote (none is configured)" in line
    assert "run `dvc repro train@eso_b_a05 judge`" in line
