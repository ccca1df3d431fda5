"""One DVC stage in this machine's checkout, sharing through the DVC remote: the flow a worker
on another machine (e.g. the ``gpu`` pool) runs for the pipeline.

It pulls what the remote has (data, outputs and run history), reproduces the stage with
`dvc repro --pull` (stages the run cache holds are restored with their outputs fetched, not
rerun) and pushes outputs and run history back, so that the machine that asked for it
restores the stage from the run cache.
"""

from __future__ import annotations

from prefect import flow

from tasks.stages import check_checkout, pull_runs, push_runs, repro_stage, stage_tags


@flow(name="esolm-stage", log_prints=True)
def stage(stage: str = "train", repo: str = ".", share: bool = True) -> str:
    """`dvc repro STAGE` in ``repo``; with ``share``, pull before and push after (a remote must be set)."""
    check_checkout(repo)
    if share:
        pull_runs(repo)
    out = repro_stage.with_options(tags=stage_tags(stage))(stage, repo, pull=share)
    if share:
        push_runs(repo)
    return out


if __name__ == "__main__":
    stage()
