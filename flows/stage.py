"""One DVC stage on another machine (e.g. the ``gpu`` pool), handed back to the pipeline.

In a worktree of the worker's checkout at ``revision`` (the pipeline's pinned commit, fetched
from ``git_remote`` when this clone lacks it; ``tasks/workspace.py``) it pulls what the DVC
remote has of the stage and its dependencies (data, outputs, run history), reproduces the stage
with `dvc repro --pull` (stages the run cache holds are restored, not rerun), pushes outputs and
run history back, and, with ``branch``, commits the updated ``dvc.lock`` on that branch and
pushes it to ``git_remote``. The pipeline merges that lock, so `dvc repro` on its side finds
the stage up to date and fetches its outputs instead of training again, even when its own
``dvc.lock`` matched ``params.yaml`` before.
"""

from __future__ import annotations

from prefect import flow

from tasks.stages import check_checkout, pull_runs, push_runs, repro_stage, stage_tags
from tasks.workspace import hand_back, pinned_worktree


@flow(name="esolm-stage", log_prints=True)
def stage(stage: str = "train", repo: str = ".", share: bool = True, revision: str | None = None,
          branch: str | None = None, git_remote: str = "origin") -> str:
    """`dvc repro STAGE` in a worktree of ``repo`` at ``revision`` (default its HEAD); with
    ``share``, pull before and push after (a DVC remote must be set); with ``branch``, the
    updated dvc.lock is committed on it and pushed to ``git_remote``."""
    check_checkout(repo)
    with pinned_worktree(repo, revision, name=f"stage-{stage}", remote=git_remote if revision else None) \
            as (work, _commit):
        if share:
            pull_runs(str(work), [stage])
        out = repro_stage.with_options(tags=stage_tags(stage))(stage, str(work), pull=share)
        if share:
            push_runs(str(work))
        if branch:
            hand_back(str(work), branch, git_remote)
    return out


if __name__ == "__main__":
    stage()
