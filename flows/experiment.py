"""Parameter overrides as DVC experiments, one at a time or as a sweep through DVC's queue.

Each flow run works in its own worktree of ``repo`` at a pinned commit (``revision``, default
the checkout's HEAD; ``tasks/workspace.py``): `dvc exp run -S` edits that worktree's
``params.yaml``, never the checkout's, and a pipeline running at the same time is not touched.
The experiments stay visible from the checkout (``dvc exp show``: their refs live in the shared
git repository); their results are ingested into the checkout's results database (``db``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.stages import (
    apply_experiment,
    check_checkout,
    check_overrides,
    exp_run,
    headline_markdown,
    ingest_and_report,
    run_queue,
)
from tasks.workspace import pinned_worktree


def grid_overrides(grid: dict[str, list]) -> list[list[str]]:
    """{'train.lr': [1e-3, 2e-3], 'model.d_model': [64]} -> one override list per combination."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*grid.values())]


def results_db(repo: str, db: str | None) -> str:
    """The results database the runs are ingested into: ``db``, else the checkout's."""
    return str(Path(db) if db else Path(repo).resolve() / "reports" / "results.duckdb")


@flow(name="esolm-experiment", log_prints=True)
def experiment(overrides: list[str], name: str | None = None, repo: str = ".",
               targets: list[str] | None = None, revision: str | None = None, db: str | None = None) -> str:
    """`dvc exp run -S ...` with the overrides (all stages, or ``targets``) in a worktree at
    ``revision``, then ingest the results under the experiment's label into ``db`` and publish
    the experiment's headline table (artifact ``esolm-experiment``)."""
    check_checkout(repo)
    check_overrides(repo, overrides)
    label = f"experiment:{name or ','.join(overrides)}"
    with pinned_worktree(repo, revision, name=f"experiment-{name or 'run'}") as (work, commit):
        exp_run(overrides, str(work), name, targets=targets)
        out = ingest_and_report(str(work), label=label, db=results_db(repo, db))
        table = headline_markdown(str(work))
    create_markdown_artifact(f"# {label}\n\n{table}\n\ncommit `{commit}`, overrides `{' '.join(overrides)}`\n",
                             key="esolm-experiment", description="the experiment's headline numbers")
    return out


@flow(name="esolm-sweep", log_prints=True)
def sweep(grid: dict[str, list], repo: str = ".", prefix: str = "sweep", jobs: int = 1,
          revision: str | None = None, db: str | None = None) -> list[str]:
    """Queue every combination of ``grid`` in a worktree at ``revision``, run the queue, then
    ingest each experiment: `dvc exp apply` brings back its params, git-tracked files and cached
    outputs into the worktree (every output is cached, so no file of the previous experiment is
    left behind)."""
    check_checkout(repo)
    check_overrides(repo, [o for overrides in grid_overrides(grid) for o in overrides])
    names = []
    with pinned_worktree(repo, revision, name=f"sweep-{prefix}") as (work, _commit):
        for i, overrides in enumerate(grid_overrides(grid)):
            name = f"{prefix}-{i}"
            exp_run(overrides, str(work), name, queue=True)
            names.append(name)
        run_queue(str(work), jobs)
        for name in names:
            apply_experiment(name, str(work))
            ingest_and_report(str(work), label=f"experiment:{name}", db=results_db(repo, db))
    return names


if __name__ == "__main__":
    import sys

    experiment(sys.argv[1:])
