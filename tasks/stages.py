"""Tasks that drive DVC, the schedule search and the results store. They pass paths and small
dicts only, take the checkout as a parameter (never change the working directory) and run
every command with ``cwd=repo``.

DVC holds one lock per checkout. Every DVC command runs with ``--wait-for-lock`` (a second
flow run waits its turn instead of failing), and every DVC task carries the tag ``dvc``: with
``prefect concurrency-limit create dvc 1`` the Prefect server also queues them, visibly, one at
a time. Each stage's task is tagged ``stage:<name>`` as well, and every task run is named after
what it does (``repro train``, ``dvc push``, ``exp run lr3``), not ``repro_stage-0d6``.

The flows call these tasks in a worktree of their own at a pinned commit (``tasks/workspace.py``),
into which ``checkout_outputs`` brings the DVC outputs a command reads from the shared cache;
a command run in a folder holding an ``esolm`` package imports that package (``PYTHONPATH``), so
the pinned code runs, not the code of whichever checkout the worker started from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import task

OFFLINE_ENV = {"DVC_NO_ANALYTICS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "MPLBACKEND": "Agg"}
DVC_TAG = "dvc"


def _bin(name: str) -> str:
    """The executable of this environment (the venv's dvc / esolm), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def check_checkout(repo: str) -> Path:
    """The checkout a flow runs in: a folder holding ``dvc.yaml``; anything else is one line
    naming the value and the fix, before any task runs."""
    path = Path(repo)
    fix = ("pass the folder of an esolm checkout, the one holding dvc.yaml and params.yaml "
           "(repo='.' when the flow runs from it)")
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ValueError(f"repo={repo!r} {what}: {fix}")
    if not (path / "dvc.yaml").is_file():
        raise ValueError(f"repo={repo!r} ({path.resolve()}) holds no dvc.yaml: {fix}")
    return path


def check_overrides(repo: str, overrides: list[str]) -> None:
    """Each ``dotted.key=value`` override (``dvc exp run -S``, ``esolm --set``) names a key of the
    checkout's params.yaml and has a YAML value; else one line naming it, the closest key and
    the file, before DVC or esolm runs. DVC's own forms (``+key=...``, ``~key``, ``file:key=...``)
    are left to DVC."""
    import copy

    import yaml

    from esolm.params import apply_sets, yaml_load

    path = check_checkout(repo) / "params.yaml"
    plain = [o for o in overrides if not str(o).startswith(("+", "~")) and ":" not in str(o).split("=", 1)[0]]
    if not plain or not path.is_file():
        return
    try:
        params = yaml_load(path.read_text(encoding="utf-8")) or {}
        apply_sets(copy.deepcopy(params), [str(o) for o in plain])
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"bad override for {path}: {' '.join(str(err).split())}") from None


def _error_line(stderr: str) -> str | None:
    """The one line that says why a command failed: esolm's ``esolm <verb>: error: ...`` (the
    cause, also under DVC), else DVC's last ``ERROR: ...`` line."""
    lines = stderr.splitlines()
    said = [line for line in lines if re.match(r"esolm [a-z-]+: error: ", line)]
    said = said or [line for line in lines if line.startswith("ERROR: ")]
    return said[-1].strip() if said else None


def run_command(args: list[str], repo: str) -> str:
    """Run a command in ``repo`` with the venv's bin first on PATH; on failure raise its one
    error line (esolm's or DVC's), or its output when it said none."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if (Path(repo) / "esolm" / "__init__.py").is_file():  # the pinned code, not the worker's checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(repo).resolve()), env.get("PYTHONPATH")) if p)
    if not Path(repo).is_dir():
        check_checkout(repo)  # one line naming it
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    for line in proc.stderr.splitlines():  # esolm's warnings reach the run's log, not only its stderr
        if re.match(r"esolm [a-z-]+: warning: ", line):
            from tasks.workspace import run_log

            run_log(line.strip(), warning=True)
    if proc.returncode:
        command = " ".join([Path(args[0]).name, *args[1:]])
        if (line := _error_line(proc.stderr)) is not None:
            raise RuntimeError(f"{command} failed ({proc.returncode}): {line}")
        raise RuntimeError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return proc.stdout


def dvc(*args: str) -> list[str]:
    """A DVC command line that waits for the repository lock instead of failing."""
    return [_bin("dvc"), "--wait-for-lock", *args]


def stage_tags(stage: str) -> set[str]:
    """The tags of a stage's task: ``dvc`` (one DVC command at a time) and ``stage:<name>``."""
    return {DVC_TAG, f"stage:{stage.split('@')[0]}"}


def _exp_run_name(parameters: dict) -> str:
    return f"exp run {parameters.get('name') or ' '.join(map(str, parameters.get('overrides') or []))}"


def _targets(targets) -> str:
    return f" {' '.join(targets)}" if targets else ""


@task(retries=1, retry_delay_seconds=5, log_prints=True, tags=[DVC_TAG], task_run_name="repro {stage}")
def repro_stage(stage: str, repo: str = ".", pull: bool = False) -> str:
    """`dvc repro STAGE` (a stage or a foreach group); unchanged stages are skipped by DVC.
    ``pull``: `--pull`, so that a stage found in the run cache (see ``pull_runs``) is restored
    with its outputs fetched from the remote instead of being run."""
    out = run_command(dvc("repro", *(["--pull"] if pull else []), stage), repo)
    print(f"dvc repro {stage}:\n{out[-2000:]}")
    return out


@task(retries=2, retry_delay_seconds=10, log_prints=True, tags=[DVC_TAG], task_run_name="dvc push")
def push_runs(repo: str = ".") -> str:
    """`dvc push --run-cache`: outputs and run history to the default remote."""
    out = run_command(dvc("push", "--run-cache"), repo)
    print(f"dvc push --run-cache: {out.strip()[-500:]}")
    return out


@task(retries=2, retry_delay_seconds=10, log_prints=True, tags=[DVC_TAG],
      task_run_name=lambda parameters: f"dvc pull{_targets(parameters.get('targets'))}")
def pull_runs(repo: str = ".", targets: list[str] | None = None) -> str:
    """`dvc pull --run-cache --allow-missing [--with-deps TARGETS]`: whatever the remote has of
    this pipeline (of ``targets`` and the stages they depend on), and the run history, so that
    `dvc repro --pull` restores stages another machine ran (fetching their outputs) instead of
    running them again."""
    with_deps = ["--with-deps", *targets] if targets else []
    out = run_command(dvc("pull", "--run-cache", "--allow-missing", *with_deps), repo)
    print(f"dvc pull --run-cache: {out.strip()[-500:]}")
    return out


@task(log_prints=True, tags=[DVC_TAG], task_run_name=_exp_run_name)
def exp_run(overrides: list[str], repo: str = ".", name: str | None = None, queue: bool = False,
            targets: list[str] | None = None) -> str:
    """`dvc exp run -S key=value ... [targets]` (or only queue it)."""
    args = dvc("exp", "run", *(targets or [])) + [a for o in overrides for a in ("-S", o)]
    if name:
        args += ["--name", name]
    if queue:
        args.append("--queue")
    return run_command(args, repo)


@task(log_prints=True, tags=[DVC_TAG], task_run_name="exp run --run-all")
def run_queue(repo: str = ".", jobs: int = 1) -> str:
    return run_command(dvc("exp", "run", "--run-all", "--jobs", str(jobs)), repo)


@task(log_prints=True, tags=[DVC_TAG], task_run_name="exp apply {name}")
def apply_experiment(name: str, repo: str = ".") -> str:
    """`dvc exp apply NAME`: its params, git-tracked files and cached outputs into the workspace."""
    return run_command(dvc("exp", "apply", name), repo)


@task(log_prints=True, tags=["duckdb"], task_run_name="report {label}")
def ingest_and_report(repo: str = ".", label: str = "pipeline", db: str | None = None) -> str:
    """`esolm report [--db DB]`: ingest the run's files into the DuckDB results database (one
    writer; ``db`` outside the worktree, so that it outlives the run) and write the report."""
    return run_command([_bin("esolm"), "report", "--label", label, *(["--db", db] if db else [])], repo)


@task(task_run_name="headline table")
def headline_markdown(repo: str = ".") -> str:
    """The headline table (``reports/metrics/<variant>/*.json`` of the checkout, each written
    by the stage that computed it) as markdown."""
    from esolm.headline import HEADLINE, read_headline
    from esolm.report import markdown_table

    reports = Path(repo) / "reports"
    names = sorted(p.name for p in (reports / "metrics").iterdir() if p.is_dir()) \
        if (reports / "metrics").is_dir() else []
    table = read_headline(names, reports)
    return markdown_table(["variant", *HEADLINE], [(n, *table[n].values()) for n in names])


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def search_inputs(repo: str, sets: list[str]) -> dict:
    """What `esolm search` reads in ``repo`` (a worktree), with the overrides ``sets``: ``needs``,
    the DVC outputs it opens ({path: the stage that writes it}: the contestant's and the judge's
    model files, and the prepared validation split the relative entropy floor is measured on),
    ``out_dir`` and ``storage`` (search.storage as written: "" for the default file)."""
    from esolm.config import SampleConfig
    from esolm.params import build, load_params, section
    from esolm.search.config import SearchConfig

    params = load_params(Path(repo) / "params.yaml", sets)
    sc = build(SearchConfig, {k: v for k, v in section(params, "search").items() if k != "device"}, "search")
    judge = build(SampleConfig, dict(section(params, "sample")), "sample").judge
    needs: dict[str, str | None] = {f"runs/{sc.variant}/model.ckpt": f"train@{sc.variant}"}
    if not judge.startswith("hf:"):  # a hub judge is no file of the pipeline
        own = (params.get("judge") or {}).get("name", "judge")  # the judge stage's model
        needs[f"runs/{judge}/model.ckpt"] = "judge" if judge == own else None
    data = section(params, "data")
    folder = Path(str(data["out_dir"])) / str(data["dataset"])
    if sc.entropy_floor <= 0 and not folder.is_absolute():  # read by stages._search_setup
        needs.update({f"{folder.as_posix()}/meta.json": "prepare", f"{folder.as_posix()}/valid.bin": "prepare"})
    return {"needs": needs, "out_dir": sc.out_dir, "storage": sc.storage, "variant": sc.variant}


def default_study_storage(repo: str, out_dir: str) -> str:
    """The study file the search stage uses by default (``<out_dir>-study.db``) in the checkout
    ``repo``, as an absolute ``sqlite:///`` URL: a flow's worktree is removed, its study is not."""
    from esolm.search.config import SearchConfig
    from esolm.search.storage import storage_url

    return storage_url(SearchConfig(out_dir=str(Path(repo).resolve() / out_dir)))


def _recorded(repo: str) -> list[str]:
    """The output paths ``dvc.lock`` of ``repo`` records."""
    import yaml

    lock = Path(repo) / "dvc.lock"
    stages = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}) if lock.is_file() else {}
    return [o["path"] for entry in stages.values() for o in entry.get("outs") or []]


def _missing_outputs(repo: str, missing: list[str], needs: dict, commit: str) -> str:
    """One line: which outputs of ``commit`` neither the lock, the cache nor the remote provides,
    and the stages to run."""
    recorded = _recorded(repo)
    unrecorded = [p for p in missing if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in recorded)]
    uncached = [p for p in missing if p not in unrecorded]
    remote = "the DVC remote" if run_command(dvc("remote", "list"), repo).strip() else \
        "a DVC remote (none is configured)"
    why = ([f"dvc.lock of commit {commit[:12]} records no {', '.join(unrecorded)}"] if unrecorded else []) + \
        ([f"{', '.join(uncached)} of commit {commit[:12]} {'is' if len(uncached) == 1 else 'are'} in neither "
          f"the DVC cache nor {remote}"] if uncached else [])
    stages = list(dict.fromkeys(needs[p] for p in missing))
    stages = " ".join(s for s in stages if s != "prepare" or len(stages) == 1)  # the trainings depend on it
    return (f"the schedule search's inputs are missing: {'; '.join(why)}: run `dvc repro {stages}` "
            "in the checkout and commit dvc.lock (and `dvc push`, for other machines), then run the flow again")


def _dvc_each(verb: str, paths: list[str], repo: str) -> str | None:
    """`dvc VERB --allow-missing PATHS`; when DVC fails (e.g. the cache lost a directory's
    listing, the remote cannot be reached), each path alone, so that one broken output keeps none
    of the others out. Returns DVC's last error line, if any."""
    errors = []
    for group in ([paths], [[p] for p in paths]):
        errors = []
        for targets in group:
            try:
                run_command(dvc(verb, "--allow-missing", *targets), repo)
            except RuntimeError as err:
                errors.append(" ".join(str(err).split()))
        if not errors:
            return None
        print(errors[-1])
    return errors[-1]


@task(log_prints=True, tags=[DVC_TAG], task_run_name="dvc checkout search inputs")
def checkout_outputs(repo: str, needs: dict[str, str | None], commit: str) -> list[str]:
    """The DVC outputs ``needs`` ({path: its stage}) of the worktree ``repo`` (at ``commit``) from
    the shared cache (`dvc checkout`), else from the DVC remote (`dvc pull --allow-missing`);
    what neither holds is one line naming the stages to run. Returns the paths."""
    orphans = [p for p, stage in needs.items() if stage is None]
    if orphans:
        raise ValueError(f"{orphans[0]} (sample.judge) is the output of no stage of dvc.yaml, so no worktree "
                         "holds it: set sample.judge to the judge stage's model (judge.name) or hf:<model>")
    paths, said = list(needs), None
    for verb in ("checkout", "pull"):
        missing = [p for p in paths if not (Path(repo) / p).exists()]
        if missing:
            said = _dvc_each(verb, missing, repo)
    missing = [p for p in paths if not (Path(repo) / p).exists()]
    if missing:
        pulled = f" (the pull said: {said[-300:]})" if said and "pull" in said else ""
        raise RuntimeError(_missing_outputs(repo, missing, needs, commit) + pulled)
    print(f"checked out {', '.join(paths)}")
    return paths


@task(tags=["search"], log_prints=True, task_run_name="search: queue trials")
def queue_trials(repo: str, n_trials: int | None, sets: list[str]) -> int:
    """`esolm search --only queue`: queue the trials missing from the study up to ``n_trials``."""
    extra = [f"search.n_trials={n_trials}"] if n_trials else []
    out = run_command([_bin("esolm"), "search", "--only", "queue", *_sets(sets + extra)], repo)
    return int(re.search(r"queued (\d+) trials", out).group(1))


@task(tags=["search"], log_prints=True, task_run_name="search: worker")
def join_search(repo: str, sets: list[str]) -> int:
    """`esolm search --only join`: one worker process that runs queued trials until none is left."""
    out = run_command([_bin("esolm"), "search", "--only", "join", "--quiet", *_sets(sets)], repo)
    return int(re.search(r"ran (\d+) queued trials", out).group(1))


@task(tags=["search"], log_prints=True, task_run_name="search: outputs")
def search_outputs(repo: str, sets: list[str]) -> str:
    """`esolm search --only outputs`: trials.parquet, pareto.json, best.json from the whole study."""
    return run_command([_bin("esolm"), "search", "--only", "outputs", "--quiet", *_sets(sets)], repo).strip()


@task(task_run_name="search: results")
def search_results(repo: str, out_dir: str) -> dict:
    """``best.json`` and ``pareto.json`` of the search's outputs under ``repo``, through their
    one reader (``esolm.search.results``), in their JSON form."""
    from esolm.search.results import read_best, read_front

    folder = Path(repo) / out_dir
    return {"best": read_best(folder).to_json(), "pareto": read_front(folder).to_json()}
