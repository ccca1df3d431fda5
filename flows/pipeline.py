"""The study as a Prefect flow: every DVC stage in order, then the headline table artifact.

The flow works in its own worktree of ``repo`` at a pinned commit (``revision``, default the
checkout's HEAD when the run starts; uncommitted changes are ignored with a warning), sharing
the checkout's DVC cache, and removes it when it succeeds (``tasks/workspace.py``): a flow run
never sees another's files, and never writes the checkout's.

With ``gpu_deployment`` (e.g. ``esolm-stage/gpu`` from prefect.yaml) the training stages
(``gpu_stages``: every variant's training and the judge's) are sent to that deployment, whose
worker runs on a GPU machine: this flow pushes the pinned commit on a hand-over branch of
``git_remote`` and the data and run history to the DVC remote, waits for the remote run, which
pushes the outputs and commits its ``dvc.lock`` on that branch; the flow merges that lock, and
`dvc repro --pull` then fetches the trained outputs instead of training again.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from tasks.stages import check_checkout, headline_markdown, push_runs, repro_stage, stage_tags
from tasks.workspace import hand_over, pinned_worktree, take_back

STAGES = ("prepare", "train", "judge", "evaluate", "sample", "curve", "bench", "search", "report")
TRAINING_STAGES = ("train", "judge")


def run_remote_stage(deployment: str, stage: str, revision: str, branch: str) -> None:
    """Run ``stage`` at ``revision`` through ``deployment`` (another work pool) and wait; it
    hands its dvc.lock back on ``branch``. Fail if it failed."""
    run = run_deployment(deployment, parameters={"stage": stage, "revision": revision, "branch": branch},
                         timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"{deployment} ({stage}) ended {run.state.name if run.state else 'without a state'}")


def handover_branch(stage: str) -> str:
    return f"esolm-handover/{flow_run.get_id() or 'local'}/{stage.replace('@', '-')}"


@flow(name="esolm-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: tuple[str, ...] = STAGES, gpu_deployment: str | None = None,
             gpu_stages: tuple[str, ...] = TRAINING_STAGES, revision: str | None = None,
             git_remote: str = "origin") -> str:
    """Run the DVC stages one after another in a worktree of ``repo`` at ``revision``."""
    check_checkout(repo)
    with pinned_worktree(repo, revision, name="pipeline") as (work, commit):
        for stage in stages:
            remote = bool(gpu_deployment) and stage in gpu_stages
            if remote:
                branch = handover_branch(stage)
                hand_over(str(work), commit, branch, git_remote)
                push_runs(str(work))
                run_remote_stage(gpu_deployment, stage, commit, branch)
                take_back(str(work), branch, git_remote, commit)
            repro_stage.with_options(tags=stage_tags(stage))(stage, str(work), pull=remote)
        table = headline_markdown(str(work))
    create_markdown_artifact(f"# esolm headline\n\n{table}\n\ncommit `{commit}`\n", key="esolm-headline",
                             description="test perplexity, sampling quality and speed per variant")
    return table


if __name__ == "__main__":
    pipeline()
