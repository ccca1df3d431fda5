"""Every edge one line (issue 22, items 4 and 5): a bad params file, a bad override, a hostile
name, a broken run file, a full disk, a bad checkout given to a flow and a killed ``prepare``
each end ``esolm <verb>`` with exit code 2 and ONE line ``esolm <verb>: error: ...`` that names
the bad value, the file and the fix; nothing is executed, nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from esolm.cli import main
from esolm.params import load_params

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["x;touch P;#", "$(touch P)", "a" * 300, "../../x", "-x", ".hidden", "a b", "q';touch P;'"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A folder holding the repository's params.yaml, as the working directory (nothing in the
    checkout is touched)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line(capsys, verb: str) -> str:
    """The one error line of ``esolm verb`` (and nothing else on stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"esolm {verb}: error: "), err
    return lines[0]


def refused(capsys, args: list[str]) -> str:
    assert main(args) == 2
    return one_line(capsys, args[0])


def with_text(project: Path, old: str, new: str) -> Path:
    text = (project / "params.yaml").read_text()
    assert old in text, old
    (project / "params.yaml").write_text(text.replace(old, new, 1))
    return project / "params.yaml"


VARIANTS = "variants:                      # name -> family and its settings\n"

# ---- 1-5: the params file and the overrides ---------------------------------------------------


def test_a_params_path_that_is_a_folder_is_one_line(project, capsys):
    (project / "conf").mkdir()
    line = refused(capsys, ["export", "--variant", "ar", "--params", "conf"])
    assert "conf is a folder" in line and "--params conf/params.yaml" in line


def test_a_python_tag_is_refused_never_executed_with_its_line(project, capsys):
    text = (project / "params.yaml").read_text()
    line_no = text.count("\n") + 1
    (project / "params.yaml").write_text(text + "evil: !!python/object/apply:os.system [\"touch PWNED\"]\n")
    line = refused(capsys, ["export", "--variant", "ar"])
    assert not (project / "PWNED").exists()
    assert f"params.yaml line {line_no}" in line and "!!python/object/apply:os.system" in line
    assert "remove the tag" in line and "<unicode string>" not in line


def test_a_python_tag_in_an_override_is_refused(project, capsys):
    line = refused(capsys, ["export", "--variant", "ar", "--set", "train.lr=!!python/object/apply:os.system [x]"])
    assert "--set train.lr=" in line and "!!python/object/apply:os.system" in line


@pytest.mark.parametrize("item,words", [
    ("train=5", ["--set train=5", "section 'train'", "--set train.KEY=VALUE"]),
    ("variants=[ar]", ["--set variants=", "section 'variants'"]),
    ("train.lr=[1, 2", ["--set train.lr=[1, 2", "not a YAML value"]),
])
def test_an_override_that_replaces_a_section_or_is_not_yaml_is_one_line(project, capsys, item, words):
    line = refused(capsys, ["export", "--variant", "ar", "--set", item])
    for word in words:
        assert word in line, line


def test_a_section_that_is_not_a_mapping_is_one_line(project, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    line = refused(capsys, ["export", "--variant", "ar"])
    assert "params.yaml: section 'train' must be a mapping" in line


@pytest.mark.parametrize("content,words", [
    (b"", ["params.yaml is empty"]),
    (b"# only a comment\n\n", ["params.yaml is empty"]),
    (bytes(range(256)) * 4, ["params.yaml is not UTF-8 text", "byte 0x80 at offset 128"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00", ["params.yaml is not", "params file"]),
])
def test_an_empty_or_binary_params_file_is_one_line_naming_it(project, capsys, content, words):
    (project / "params.yaml").write_bytes(content)
    line = refused(capsys, ["export", "--variant", "ar"])
    for word in words:
        assert word in line, line


def test_an_unknown_top_level_section_is_refused_with_the_closest_name(project, capsys):
    with_text(project, "\ntrain:\n", "\ntrian:\n")
    line = refused(capsys, ["export", "--variant", "ar"])
    assert "unknown section 'trian'" in line and "did you mean 'train'?" in line and "params.yaml" in line


# ---- 6: names that become folders and words of commands ---------------------------------------


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_variant_names_are_refused_before_anything_runs(project, capsys, name):
    with_text(project, VARIANTS, VARIANTS + f"  {json.dumps(name)}:\n    family: ar\n")
    line = refused(capsys, ["export", "--variant", "ar"])
    assert "variant name" in line and "letters, digits" in line and "at most 64" in line
    assert not (project / "P").exists() and not (project / "reports").exists()


@pytest.mark.parametrize("key,old", [("judge.name", "  name: judge "), ("sample.judge", "  judge: judge ")])
@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "x;touch P;#", "a" * 300])
def test_the_judges_folder_name_is_checked_like_a_variant_name(project, capsys, key, old, name):
    with_text(project, old, old.split(":")[0] + f": {json.dumps(name)} ")
    line = refused(capsys, ["export", "--variant", "ar"])
    assert f"{key}={name!r}"[:40] in line and "letters, digits" in line


def test_a_hub_judge_and_the_shipped_names_stay_valid(project):
    load_params("params.yaml", ["sample.judge=hf:gpt2-large"])
    load_params("params.yaml", ["preset=cpu-study"])
    load_params("params.yaml", ["judge.name=judge_v2", "sample.judge=judge_v2"])


def test_dvc_commands_quote_every_interpolated_name():
    """DVC runs each cmd through a shell: an interpolated name is a single-quoted word, so a
    name such as ``x;touch P;#`` reaches ``esolm`` (which refuses it) instead of the shell."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    import re

    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        for hit in re.finditer(r"\$\{[^}]*\}", cmd):
            quoted = cmd[:hit.start()].count("'") % 2 == 1 and cmd[hit.end():].count("'") % 2 == 1
            assert quoted, f"dvc.yaml stage {name}: {hit.group()} is not single-quoted in {cmd!r}"


@pytest.mark.slow
def test_a_hostile_variant_name_runs_no_shell_command_through_dvc(tmp_path):
    """The real dvc.yaml in a scratch repository, with a fake ``esolm`` that records its words."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    text = (ROOT / "params.yaml").read_text()
    (repo / "params.yaml").write_text(text.replace(VARIANTS, VARIANTS + '  "x;touch P;#":\n    family: ar\n'
                                                   '  "$(touch R)":\n    family: ar\n', 1))
    (repo / "bin").mkdir()
    (repo / "bin" / "esolm").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done >> "$DVC_ROOT/argv.log"\n')
    (repo / "bin" / "esolm").chmod(0o755)
    (repo / "data" / "processed").mkdir(parents=True)
    shutil.copytree(ROOT / "esolm", repo / "esolm", ignore=shutil.ignore_patterns("__pycache__"))  # the deps
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{repo / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env=env)
    said = [subprocess.run([dvc, "repro", "-s", stage], cwd=repo, env=env, capture_output=True, text=True,
                           check=False).stderr for stage in ("train@x;touch P;#", "train@$(touch R)")]
    assert not (repo / "P").exists() and not (repo / "R").exists()
    assert (repo / "argv.log").exists(), said
    words = (repo / "argv.log").read_text().splitlines()
    assert "x;touch P;#" in words and "$(touch R)" in words


# ---- 7: the search storage ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["bogus://", "sqlite://nope", "sqlite:/one/slash.db", "postgres//host/db"])
def test_an_unsupported_search_storage_is_one_line_naming_the_forms(project, capsys, url):
    line = refused(capsys, ["search", "--only", "queue", "--set", f"search.storage={url}"])
    assert f"search.storage={url!r}" in line
    assert "sqlite:///PATH" in line and "journal:PATH" in line and "postgresql" in line


def test_a_storage_url_of_a_missing_driver_is_one_line():
    pytest.importorskip("optuna")
    from esolm.search.storage import open_storage

    with pytest.raises(ValueError, match=r"search.storage='bogus\+nodriver://h/db'.*sqlite:///PATH") as err:
        open_storage("bogus+nodriver://h/db")
    assert "\n" not in str(err.value)


# ---- 8-10: run files, model files, a full disk -------------------------------------------------

RUN_FILES = [("LikelihoodResult", "likelihood.json", "evaluate"), ("GenerationResult", "generation.json", "sample"),
             ("CurveResult", "curve.json", "curve")]


@pytest.mark.parametrize("cls,file,stage", RUN_FILES)
@pytest.mark.parametrize("content", [b'{"variant": "ar", "family": "a', b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_a_broken_run_file_names_the_file_and_the_stage_that_rewrites_it(tmp_path, cls, file, stage, content):
    import esolm.results

    run = tmp_path / "runs" / "ar"
    run.mkdir(parents=True)
    (run / file).write_bytes(content)
    with pytest.raises(ValueError) as err:
        getattr(esolm.results, cls).read(run)
    message = str(err.value)
    assert "\n" not in message and str(run / file) in message
    assert f"dvc repro -f {stage}@ar" in message and f"esolm {stage} --variant ar" in message


def test_the_judges_broken_likelihood_file_names_the_judge_stage(tmp_path):
    from esolm.results import LikelihoodResult

    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "likelihood.json").write_text("{")
    with pytest.raises(ValueError, match="dvc repro -f judge"):
        LikelihoodResult.read(tmp_path / "judge")


@pytest.mark.parametrize("name,fix", [("model.ckpt", "dvc repro -f train@ar"),
                                      ("checkpoints/last.ckpt", "--fresh")])
def test_a_truncated_model_file_or_checkpoint_names_the_file_and_the_fix(tmp_path, name, fix):
    import torch

    from esolm.io import safe_load

    path = tmp_path / "runs" / "ar" / name
    path.parent.mkdir(parents=True)
    torch.save({"weights": {"w": torch.zeros(1000)}, "format": "x"}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        safe_load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "truncated" in message and fix in message


def test_a_truncated_model_file_is_one_line_through_the_cli(project, capsys):
    (project / "runs" / "ar").mkdir(parents=True)
    (project / "runs" / "ar" / "model.ckpt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    line = refused(capsys, ["export", "--variant", "ar", "--out", "exp"])
    assert "runs/ar/model.ckpt" in line and "dvc repro -f train@ar" in line


def test_a_full_disk_is_one_line_naming_the_file(project, capsys, monkeypatch):
    import esolm.io

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(esolm.io.os, "replace", full)
    before = (project / "params.yaml").read_text()
    line = refused(capsys, ["preset", "cpu-study"])
    assert "disk full while writing params.yaml" in line and "free space" in line
    assert (project / "params.yaml").read_text() == before and [p.name for p in project.iterdir()] == ["params.yaml"]


@pytest.mark.parametrize("error", [IsADirectoryError(21, "Is a directory", "runs/ar/likelihood.json"),
                                   PermissionError(13, "Permission denied", "runs/ar/model.ckpt")])
def test_other_file_system_errors_are_one_line_naming_the_file(project, capsys, monkeypatch, error):
    import esolm.cli

    def verb(args, params):
        raise error

    monkeypatch.setitem(esolm.cli.VERBS, "metrics", (verb, ""))
    line = refused(capsys, ["metrics"])
    assert error.filename in line and error.strerror in line


# ---- 11: the Prefect flows ---------------------------------------------------------------------


def _checkout(tmp: Path) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.001}, "variants": {}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {}}))
    return repo


@pytest.mark.parametrize("repo", ["/no/such/checkout", "params.yaml", "."])
def test_a_flow_given_a_bad_checkout_is_one_line_naming_it(tmp_path, monkeypatch, repo):
    pytest.importorskip("prefect")
    from flows.experiment import experiment, sweep
    from flows.pipeline import pipeline
    from flows.search import schedule_search
    from flows.stage import stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    calls = [lambda: experiment.fn(["train.lr=1"], repo=repo), lambda: sweep.fn({"train.lr": [1]}, repo=repo),
             lambda: pipeline.fn(repo=repo), lambda: schedule_search.fn(repo=repo), lambda: stage.fn(repo=repo)]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and f"repo={repo!r}" in message and "dvc.yaml" in message


@pytest.mark.parametrize("overrides,words", [
    (["train.lrr=1"], ["train.lrr", "did you mean 'lr'"]), (["train.lr"], ["train.lr", "key=value"]),
    (["train.lr=[1"], ["train.lr=[1", "YAML"]),
])
def test_a_flow_given_a_bad_override_is_one_line_before_dvc_runs(tmp_path, overrides, words):
    pytest.importorskip("prefect")
    from flows.experiment import experiment, sweep
    from flows.search import schedule_search

    repo = str(_checkout(tmp_path))
    grid = {o.split("=")[0]: [o.split("=", 1)[1] if "=" in o else ""] for o in overrides}
    calls = [lambda: experiment.fn(overrides, repo=repo), lambda: schedule_search.fn(repo=repo, sets=overrides)]
    if "=" in overrides[0]:
        calls.append(lambda: sweep.fn(grid, repo=repo))
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "params.yaml" in message, message
        for word in words:
            assert word in message, message


def test_a_failed_esolm_command_in_a_task_raises_its_one_error_line(tmp_path):
    pytest.importorskip("prefect")
    from tasks.stages import run_command

    script = ("import sys; print('progress'); "
              "print('esolm train: error: bad thing; fix it', file=sys.stderr); sys.exit(2)")
    with pytest.raises(RuntimeError) as err:
        run_command([sys.executable, "-c", script], str(tmp_path))
    assert str(err.value).splitlines()[0].endswith("esolm train: error: bad thing; fix it")


# ---- 12: a killed prepare ----------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from esolm.data import DataConfig
    p = sys.modules["esolm.data.prepare"]
    cfg = DataConfig(dataset="tiny", source=sys.argv[1], tokenizer="bpe:300", length=int(sys.argv[2]),
                     out_dir=sys.argv[3], cache_dir=sys.argv[4])
    write = p._write_split
    def killed(path, split, *args):
        stats = write(path, split, *args)
        if split == "valid":
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a CI timeout would
        return stats
    p._write_split = killed
    p.prepare(cfg, progress=False)
""")


def test_a_killed_prepare_leaves_the_previous_dataset_and_nothing_else(tmp_path):
    from esolm.data import DataConfig, prepare
    from tests.data.conftest import write_txt_corpus

    corpus = write_txt_corpus(tmp_path / "docs")
    out_dir, raw = tmp_path / "out", tmp_path / "raw"
    source = f"files:{corpus}/*.txt"
    out = prepare(DataConfig(dataset="tiny", source=source, tokenizer="bpe:300", length=16,
                             out_dir=str(out_dir), cache_dir=str(raw)), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, source, "32", str(out_dir), str(raw)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert [p.name for p in out_dir.iterdir()] == ["tiny"], proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_prepare_removes_what_a_killed_run_left(small_cfg_dir):
    """A SIGKILL runs no clean-up: the next prepare removes the staging folders of dead processes."""
    from esolm.data import prepare

    cfg, out_dir = small_cfg_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for name in (f".tiny.new-{dead}-abc", f".tiny.old-{dead}-abc"):
        (out_dir / name).mkdir(parents=True)
        (out_dir / name / "train.bin").write_bytes(b"\x00" * 10)
    (out_dir / f".tiny.new-{os.getpid()}-live").mkdir()  # a running prepare's: kept
    prepare(cfg, progress=False)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([f".tiny.new-{os.getpid()}-live", "tiny"])


@pytest.fixture
def small_cfg_dir(tmp_path):
    from esolm.data import DataConfig
    from tests.data.conftest import write_txt_corpus

    corpus = write_txt_corpus(tmp_path / "docs")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return DataConfig(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer="bpe:300", length=16,
                      out_dir=str(out_dir), cache_dir=str(tmp_path / "raw")), out_dir
