"""DVC experiments compare, queued experiments reuse what did not change, and a remote shares
runs between two clones (slow: one tiny `dvc repro` of every stage, about 3-5 minutes)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.data.conftest import write_txt_corpus
from tests.test_pipeline_e2e import tiny_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args: list[str], repo: Path) -> str:
    """Run a command in ``repo`` with this venv's tools and the clone's own esolm package."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(repo),
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def two_variant_study(repo: Path, corpus: Path) -> None:
    tiny_params(repo, corpus)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["variants"] = {"ar": {"family": "ar"}, "eso_b_a05": {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}}
    p["search"].update(variant="eso_b_a05", n_trials=2)
    p["bench"].update(families=["eso_b", "ar"])
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.slow
def test_experiments_compare_and_a_remote_shares_runs(tmp_path):
    one, two, remote = tmp_path / "one", tmp_path / "two", tmp_path / "remote"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(one)], check=True)
    two_variant_study(one, write_txt_corpus(tmp_path / "docs", n_docs=60))
    run(["dvc", "repro"], one)
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], one)
    run(["git", "add", "-A"], one)
    run(["git", "commit", "-qm", "tiny study"], one)
    assert run(["git", "status", "--porcelain"], one).strip() == ""  # every metric file is committed

    # a queued experiment reuses the trained models and carries its headline numbers
    run(["dvc", "exp", "run", "--queue", "-n", "draws1", "-S", "evaluate.nelbo_draws=1"], one)
    run(["dvc", "exp", "run", "--run-all"], one)
    logs = run(["dvc", "queue", "logs", "draws1"], one)
    assert "Running stage 'evaluate@ar'" in logs and "Running stage 'train@" not in logs
    table = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], one))))
    baseline = next(r for r in table if r["typ"] == "baseline" and r["rev"] != "workspace")
    experiment = next(r for r in table if r["Experiment"] == "draws1")
    for row in (baseline, experiment):
        for key in ("exact_ppl", "nelbo_ppl", "gen_ppl", "s_per_sample"):
            stage = "likelihood" if key.endswith("ppl") and key != "gen_ppl" else "sampling"
            value = row[f"reports/metrics/eso_b_a05/{stage}.json:{key}"]
            assert float(value) > 0, f"{row['rev']} lacks {key}: {value!r}"
    assert experiment["evaluate.nelbo_draws"] == "1" and baseline["evaluate.nelbo_draws"] == "2"
    assert "nelbo_ppl" in run(["dvc", "metrics", "diff", "HEAD", "draws1"], one)

    # push from one clone, pull in another: nothing left to run
    run(["dvc", "push"], one)
    subprocess.run(["git", "clone", "-q", str(one), str(two)], check=True)
    run(["dvc", "pull"], two)
    dry = run(["dvc", "repro", "--dry"], two)
    assert "Running stage" not in dry, dry
    assert "up to date" in run(["dvc", "status"], two)
    for name in ("ar", "eso_b_a05"):
        path = Path("runs") / name / "model.ckpt"
        assert (two / path).read_bytes() == (one / path).read_bytes()
    assert (two / "reports" / "search" / "study.db").exists()
