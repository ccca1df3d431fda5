"""Where a flow run works: its own ``git worktree`` of the repository at a pinned commit.

A flow never runs DVC in a checkout someone edits, nor in one another flow uses: it resolves
the commit it runs (``revision``; default the checkout's ``HEAD`` when the run starts), adds a
worktree of that commit under ``<git dir>/esolm-worktrees/`` (``$ESOLM_WORKTREES`` to put them
elsewhere), runs every stage there, and removes it when the run succeeds. A failed run keeps its
worktree for debugging; the log names it and the command that removes it.

- **Uncommitted changes are ignored, with a warning** naming the changed files: the run uses the
  commit, never the edits (a worker's checkout is often left with an updated ``dvc.lock`` by a
  `dvc repro`; refusing would stop every nightly). Commit what the run should use.
- **One cache.** The worktree uses the main checkout's DVC cache (``dvc cache dir --local``), so
  outputs and the run cache (``<cache>/runs``) are shared: nothing that one run made is made
  again by the next. Its ``.dvc/config.local`` (remote credentials, ...) is copied, and
  ``data/raw`` (the verified downloads, not a DVC output) is linked to the main checkout's.
- **Nothing leaks back:** `dvc exp run -S` edits the worktree's ``params.yaml``; the main
  checkout's files are never written (the shared files are passed explicitly: the results
  database with ``--db``, the schedule search's study file with ``--set search.storage=``).
- **Outputs a flow reads, not runs** (the schedule search's models and data) are checked out into
  the worktree from the shared cache, else pulled (``tasks.stages.checkout_outputs``).

Handing results back between machines (the ``gpu`` pool): ``commit_lock`` commits a worktree's
``dvc.lock`` on a branch and pushes it to a git remote; ``merge_lock`` fetches that branch and
takes, stage by stage, the entries that changed against the pinned commit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "esolm flow", "GIT_AUTHOR_EMAIL": "esolm-flow@localhost",
                "GIT_COMMITTER_NAME": "esolm flow", "GIT_COMMITTER_EMAIL": "esolm-flow@localhost"}


def run_log(message: str, warning: bool = False) -> None:
    """To the flow run's log when there is one, else to stderr."""
    try:
        from prefect.logging import get_run_logger

        logger = get_run_logger()
    except Exception:  # no run context (a plain call, a test)
        print(message, file=sys.stderr)
        return
    (logger.warning if warning else logger.info)(message)


def git(repo: str | Path, *args: str, check: bool = True) -> str:
    """``git ARGS`` in ``repo``; on failure one line: the command and git's last message line."""
    env = {**os.environ, **{k: v for k, v in GIT_IDENTITY.items() if k not in os.environ}}
    proc = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode:
        said = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {said[-1] if said else proc.returncode}")
    return proc.stdout.strip() if check or not proc.returncode else ""


def _dvc(repo: str | Path, *args: str) -> str:
    from tasks.stages import dvc, run_command

    return run_command(dvc(*args), str(repo)).strip()


def dirty_files(repo: str | Path) -> list[str]:
    """Tracked files of the checkout that differ from its HEAD, staged or not (untracked files do
    not count)."""
    return git(repo, "diff", "--name-only", "HEAD").splitlines()


def resolve_revision(repo: str | Path, revision: str | None = None, remote: str | None = None) -> str:
    """The full commit id a run pins: ``revision`` (a commit, branch or tag), else the checkout's
    HEAD, warning that uncommitted changes are ignored. A commit this clone lacks is fetched from
    ``remote`` (e.g. the pipeline's commit on the GPU machine); still missing: one line."""
    from tasks.stages import check_checkout

    check_checkout(str(repo))
    if revision is None:
        if changed := dirty_files(repo):
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            run_log(f"{Path(repo).resolve()} has uncommitted changes ({shown}): ignored, the run uses "
                 "the commit HEAD; commit them to run them", warning=True)
        revision = "HEAD"
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
    if not found and remote:
        git(repo, "fetch", "--quiet", remote, check=False)
        git(repo, "fetch", "--quiet", remote, revision, check=False)
        found = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
    if not found:
        where = f" nor on the git remote {remote!r}" if remote else ""
        raise ValueError(f"revision={revision!r} is no commit of {Path(repo).resolve()}{where}: "
                         "push that commit (or pass one this repository has)")
    return found


def _worktrees_dir(repo: str | Path) -> Path:
    if folder := os.environ.get("ESOLM_WORKTREES"):
        return Path(folder)
    common = Path(git(repo, "rev-parse", "--git-common-dir"))
    return (common if common.is_absolute() else Path(repo).resolve() / common) / "esolm-worktrees"


def add_worktree(repo: str | Path, commit: str, name: str | None = None) -> Path:
    """A detached worktree of ``commit`` that shares the checkout's DVC cache, config.local and
    downloads; returns its folder."""
    repo = Path(repo).resolve()
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "run")
    path = _worktrees_dir(repo) / f"{label}-{commit[:8]}-{uuid.uuid4().hex[:6]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--detach", "--quiet", str(path), commit)
    local = repo / ".dvc" / "config.local"
    if local.is_file() and (path / ".dvc").is_dir():
        shutil.copy2(local, path / ".dvc" / "config.local")
    cache = Path(_dvc(repo, "cache", "dir").splitlines()[-1].strip())
    _dvc(path, "cache", "dir", "--local", str(cache if cache.is_absolute() else repo / cache))
    raw = repo / "data" / "raw"
    if raw.is_dir() and not (path / "data" / "raw").exists():
        (path / "data").mkdir(exist_ok=True)
        (path / "data" / "raw").symlink_to(raw, target_is_directory=True)
    run_log(f"working in {path} (commit {commit[:12]} of {repo}; DVC cache {cache})")
    return path


def remove_worktree(repo: str | Path, path: Path) -> None:
    git(repo, "worktree", "remove", "--force", str(path), check=False)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    git(repo, "worktree", "prune", check=False)


@contextmanager
def pinned_worktree(repo: str | Path, revision: str | None = None, name: str | None = None,
                    remote: str | None = None) -> Iterator[tuple[Path, str]]:
    """``(folder, commit)``: a worktree of ``revision`` (default HEAD) for the body; removed when
    the body succeeds, kept (and named in the log) when it fails."""
    commit = resolve_revision(repo, revision, remote)
    path = add_worktree(repo, commit, name)
    try:
        yield path, commit
    except BaseException:
        run_log(f"the run failed: its worktree is kept for debugging at {path} "
             f"(remove it with: git -C {Path(repo).resolve()} worktree remove --force {path})", warning=True)
        raise
    remove_worktree(repo, path)


def commit_lock(worktree: str | Path, branch: str, remote: str) -> str:
    """Commit the worktree's ``dvc.lock`` and the git-tracked outputs its stages wrote (``cache:
    false`` metrics and plots, which no DVC remote holds) on ``branch`` and push the branch to
    ``remote``; returns the new commit."""
    git(worktree, "add", "-u")
    new = [f for f in git(worktree, "ls-files", "--others", "--exclude-standard").splitlines()
           if f != "data/raw" and not f.startswith("data/raw/")]  # the link to the shared downloads
    if new:
        git(worktree, "add", "--", *new)
    git(worktree, "commit", "--quiet", "--allow-empty", "-m", f"dvc.lock after {branch}")
    commit = git(worktree, "rev-parse", "HEAD")
    git(worktree, "push", "--quiet", "--force", remote, f"HEAD:refs/heads/{branch}")
    return commit


def _stages(text: str | None) -> dict:
    return (yaml.safe_load(text) or {}).get("stages", {}) if text else {}


def merge_lock(worktree: str | Path, branch: str, remote: str, base: str) -> list[str]:
    """Fetch ``branch`` from ``remote`` and take into the worktree's ``dvc.lock`` each stage
    entry of the branch's lock that differs from the lock of ``base`` (the pinned commit): what
    the other machine ran. Returns those stage names."""
    git(worktree, "fetch", "--quiet", remote, f"refs/heads/{branch}")
    theirs = _stages(git(worktree, "show", "FETCH_HEAD:dvc.lock", check=False) or None)
    before = _stages(git(worktree, "show", f"{base}:dvc.lock", check=False) or None)
    path = Path(worktree) / "dvc.lock"
    lock = yaml.safe_load(path.read_text()) if path.is_file() else None
    lock = lock or {"schema": "2.0", "stages": {}}
    taken = [name for name, entry in theirs.items() if before.get(name) != entry]
    for name in taken:
        lock.setdefault("stages", {})[name] = theirs[name]
    if taken:
        path.write_text(yaml.safe_dump(lock, sort_keys=False))
    # their git-tracked outputs (cache: false): DVC finds them in git, not in the remote, and a
    # stale one would make the stage look changed
    outs = [o["path"] for name in taken for o in theirs[name].get("outs", [])]
    changed = git(worktree, "diff", "--name-only", base, "FETCH_HEAD").splitlines()
    files = [f for f in changed if any(f == o or f.startswith(o.rstrip("/") + "/") for o in outs)]
    if files:
        git(worktree, "checkout", "FETCH_HEAD", "--", *files)
    return taken


def delete_branch(repo: str | Path, branch: str, remote: str) -> None:
    """Remove the hand-over branch from the remote once its lock is merged (best effort)."""
    git(repo, "push", "--quiet", remote, "--delete", branch, check=False)


def _task(**kwargs):
    from prefect import task

    return task(log_prints=True, **kwargs)


@_task(task_run_name="hand back {branch}")
def hand_back(worktree: str, branch: str, remote: str) -> str:
    """The remote stage's side: its ``dvc.lock`` committed on ``branch`` and pushed."""
    commit = commit_lock(worktree, branch, remote)
    print(f"dvc.lock committed as {commit[:12]} and pushed to {remote} {branch}")
    return commit


@_task(task_run_name="hand over {branch}")
def hand_over(worktree: str, commit: str, branch: str, remote: str) -> None:
    """The pipeline's side, before a remote stage: the pinned commit pushed on ``branch``, so
    that the other machine can check it out even when it was never pushed elsewhere."""
    git(worktree, "push", "--quiet", "--force", remote, f"{commit}:refs/heads/{branch}")


@_task(task_run_name="take back {branch}")
def take_back(worktree: str, branch: str, remote: str, base: str) -> list[str]:
    """The pipeline's side, after a remote stage: the stages it ran merged into the worktree's
    ``dvc.lock`` (then `dvc repro --pull` fetches their outputs instead of running them), and the
    branch deleted from the remote."""
    taken = merge_lock(worktree, branch, remote, base)
    delete_branch(worktree, branch, remote)
    print(f"took {len(taken)} stage(s) from {remote} {branch}: {', '.join(taken) or 'none changed'}")
    return taken
