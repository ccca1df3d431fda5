"""dvc.yaml's code dependencies: each stage lists every source file its esolm verb can run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from esolm.codedeps import STAGES, code_files, covered, relative, stage_code

ROOT = Path(__file__).resolve().parents[1]


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: s.get("do", s) for name, s in stages.items()}


def test_every_stage_lists_the_code_its_command_runs():
    """A change to stages.py, noise.py, config.py, io.py, params.py or device.py used to rerun
    nothing; ordering.py and data/batches.py were seen only by the wrong stage."""
    stages = _stages()
    verbs = {name: s["cmd"].split()[1] for name, s in stages.items() if s["cmd"].startswith("esolm ")}
    assert set(verbs.values()) <= set(STAGES), f"add the verbs {set(verbs.values()) - set(STAGES)} to STAGES"
    missing = {name: [f for f in stage_code(verb) if not covered(f, stages[name].get("deps", []))]
               for name, verb in verbs.items()}
    assert not any(missing.values()), f"dvc.yaml deps miss (python -m esolm.codedeps lists them): {missing}"


def test_the_follower_sees_lazy_imports_tables_and_type_only_imports():
    train = relative(code_files("esolm.cli:cmd_train"))
    assert {"esolm/training.py", "esolm/objectives.py", "esolm/noise.py", "esolm/ordering.py",
            "esolm/seeds.py", "esolm/model/backbone.py", "esolm/stages.py", "esolm/params.py"} <= set(train)
    assert not any(f.startswith("esolm/search") for f in train) and "esolm/report.py" not in train  # other verbs' code
    report = relative(code_files("esolm.cli:cmd_report"))
    assert "esolm/bench.py" not in report and "esolm/report_figures.py" in report  # the report reads DuckDB only
    assert "esolm/bench.py" in relative(code_files("esolm.cli:main"))  # reached only through the VERBS table
    prepare = relative(code_files("esolm.cli:cmd_prepare"))
    assert "esolm/model/backbone.py" not in prepare  # imported under TYPE_CHECKING only


def test_the_committed_dvc_lock_is_fresh_against_the_committed_code():
    """The lock records what every stage last ran with; when code or params change without a
    rerun (`dvc repro`, then commit dvc.lock and reports/), the lock goes stale and this fails.
    Data and outputs are not checked: a clean clone has none of them."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    stale = {}
    for stage, changes in json.loads(out or "{}").items():
        for change in changes:
            if isinstance(change, str):  # e.g. "changed command"
                stale.setdefault(stage, []).append(change)
            elif isinstance(change, dict):
                deps = change.get("changed deps", {})
                stale_deps = [p for p in deps if p.startswith("esolm") or p == "params.yaml"]
                if stale_deps:
                    stale.setdefault(stage, []).extend(stale_deps)
    assert not stale, f"dvc.lock is stale (run dvc repro and commit dvc.lock and reports/): {stale}"


def test_the_sample_stage_lists_the_best_schedule_file_it_reads(tmp_path, monkeypatch):
    """``sample.schedule: best`` reads reports/search/best.json: every file the sample section
    reads must be a dep of the sample stage (DVC has no conditional deps: it is listed always)."""
    import json

    from esolm.params import load_params
    from esolm.stages import sample_config

    params = load_params(ROOT / "params.yaml", ["sample.schedule=best"])
    best = tmp_path / params["search"]["out_dir"] / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"schedule": {"steps": 8, "order": "random"}}))
    read: list[Path] = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (read.append(self), real(self, *a, **k))[1])
    monkeypatch.chdir(tmp_path)
    assert sample_config(params).steps == 8
    monkeypatch.undo()
    deps = _stages()["sample"]["deps"]
    assert read and all(covered(p.as_posix(), deps) for p in read), (read, deps)
    search_outs = [next(iter(o)) if isinstance(o, dict) else o for o in _stages()["search"]["outs"]]
    assert all(p.as_posix() in search_outs for p in read)  # produced by the search stage: an edge, no cycle


@pytest.mark.parametrize("override", ["train.seed=1", "evaluate.nelbo_draws=1", "sample.steps=8", "search.n_trials=4"])
def test_an_experiment_changes_one_line_of_params_yaml(tmp_path, override):
    """`dvc exp run -S key=value` rewrites params.yaml through DVC's own YAML writer: params.yaml is
    kept in that writer's layout (block lists, its quoting), so an experiment's diff is the one
    line it sets, comments kept (it was a 130-line diff: issue #27)."""
    import difflib
    import shutil

    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    apply_overrides(str(copy), [override])
    diff = [ln for ln in difflib.unified_diff((ROOT / "params.yaml").read_text().splitlines(),
                                              copy.read_text().splitlines(), n=0, lineterm="")
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    key, value = override.rsplit("=", 1)
    assert len(diff) == 2 and diff[1][1:].split("#")[0].strip() == f"{key.rsplit('.', 1)[1]}: {value}", diff
