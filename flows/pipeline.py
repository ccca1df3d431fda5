"""The study as a Prefect flow: every DVC stage in order, then the headline table artifact.

With ``gpu_deployment`` (e.g. ``esolm-stage/gpu`` from prefect.yaml) the stages in
``gpu_stages`` are sent to that deployment, whose worker runs on a GPU machine in its own
checkout: this flow pushes the prepared data and run history to the DVC remote, waits for the
remote run, pulls its run history, and `dvc repro --pull` then restores the stage (fetching the
outputs) instead of running it.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment

from tasks.stages import check_checkout, headline_markdown, pull_runs, push_runs, repro_stage, stage_tags

STAGES = ("prepare", "train", "evaluate", "sample", "bench", "search", "report")


def run_remote_stage(deployment: str, stage: str) -> None:
    """Run ``stage`` through ``deployment`` (another work pool) and wait; fail if it failed."""
    run = run_deployment(deployment, parameters={"stage": stage}, timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"{deployment} ({stage}) ended {run.state.name if run.state else 'without a state'}")


@flow(name="esolm-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: tuple[str, ...] = STAGES, gpu_deployment: str | None = None,
             gpu_stages: tuple[str, ...] = ("train",)) -> str:
    """Run the DVC stages one after another (DVC holds a repo lock, so no stage overlaps)."""
    check_checkout(repo)
    for stage in stages:
        remote = bool(gpu_deployment) and stage in gpu_stages
        if remote:
            push_runs(repo)
            run_remote_stage(gpu_deployment, stage)
            pull_runs(repo)
        repro_stage.with_options(tags=stage_tags(stage))(stage, repo, pull=remote)
    table = headline_markdown(repo)
    create_markdown_artifact(f"# esolm headline\n\n{table}\n", key="esolm-headline",
                             description="test perplexity, sampling quality and speed per variant")
    return table


if __name__ == "__main__":
    pipeline()
