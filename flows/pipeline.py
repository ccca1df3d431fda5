"""The study as a Prefect flow: every DVC stage in order, then the headline table artifact."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.stages import headline_markdown, repro_stage

STAGES = ("prepare", "train", "evaluate", "sample", "bench", "search", "report")


@flow(name="esolm-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: tuple[str, ...] = STAGES) -> str:
    """Run the DVC stages one after another (DVC holds a repo lock, so no stage overlaps)."""
    for stage in stages:
        repro_stage(stage, repo)
    table = headline_markdown(repo)
    create_markdown_artifact(f"# esolm headline\n\n{table}\n", key="esolm-headline",
                             description="test perplexity, sampling quality and speed per variant")
    return table


if __name__ == "__main__":
    pipeline()
