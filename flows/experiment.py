"""Parameter overrides as DVC experiments, one at a time or as a sweep through DVC's queue."""

from __future__ import annotations

import itertools

from prefect import flow

from tasks.stages import apply_experiment, check_overrides, exp_run, ingest_and_report, run_queue


def grid_overrides(grid: dict[str, list]) -> list[list[str]]:
    """{'train.lr': [1e-3, 2e-3], 'model.d_model': [64]} -> one override list per combination."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*grid.values())]


@flow(name="esolm-experiment", log_prints=True)
def experiment(overrides: list[str], name: str | None = None, repo: str = ".",
               targets: list[str] | None = None) -> str:
    """`dvc exp run -S ...` with the overrides (all stages, or ``targets``), then ingest the
    results under the experiment's label (the workspace holds the experiment's outputs)."""
    check_overrides(repo, overrides)
    exp_run(overrides, repo, name, targets=targets)
    return ingest_and_report(repo, label=f"experiment:{name or ','.join(overrides)}")


@flow(name="esolm-sweep", log_prints=True)
def sweep(grid: dict[str, list], repo: str = ".", prefix: str = "sweep", jobs: int = 1) -> list[str]:
    """Queue every combination of ``grid``, run the queue, then ingest each experiment: `dvc exp
    apply` brings back its params, git-tracked files and cached outputs (every output is cached,
    so no file of the previous experiment is left behind)."""
    check_overrides(repo, [o for overrides in grid_overrides(grid) for o in overrides])
    names = []
    for i, overrides in enumerate(grid_overrides(grid)):
        name = f"{prefix}-{i}"
        exp_run(overrides, repo, name, queue=True)
        names.append(name)
    run_queue(repo, jobs)
    for name in names:
        apply_experiment(name, repo)
        ingest_and_report(repo, label=f"experiment:{name}")
    return names


if __name__ == "__main__":
    import sys

    experiment(sys.argv[1:])
