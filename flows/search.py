"""The schedule search with its trials spread over concurrent worker processes (Prefect tasks).

The flow works in its own worktree of ``repo`` at a pinned commit (``revision``, default the
checkout's HEAD when the run starts; uncommitted changes are ignored with a warning;
``tasks/workspace.py``): the search's outputs (``search.out_dir``, the DVC outputs of the
``search`` stage) are written there, never in the checkout, and the worktree is removed when the
run succeeds (kept, and named in the log, when it fails). What the search reads, the contestant's
and the judge's ``runs/<name>/model.ckpt`` and the prepared validation split, is checked out from
the shared DVC cache, else pulled from the DVC remote (``checkout_outputs``); neither: one line
naming the stages to run (``dvc repro train@<variant> judge``).

The study outlives the worktree: with ``search.storage`` empty (after ``sets``) every
``esolm search`` call gets ``--set search.storage=sqlite:///<repo>/<out_dir>-study.db``, the
checkout's own study file (the one the DVC stage uses, git-ignored), so that each flow run extends
one study; with a storage URL (PostgreSQL, ``${NAME}`` read from the environment: see
``esolm/search/storage.py``) that one, shared with workers on other machines.

The first task queues exactly the trials missing from the model's study; each worker task runs
``esolm search --only join`` in its own process (own GIL and model copy), running trials until
the study holds ``n_trials`` counted trials; the last task writes the outputs from every trial,
published as the markdown artifact ``esolm-search`` (the chosen schedule, the Pareto front, the
commit, the storage with its password masked). Workers on other machines can join the same study
(``esolm search --only join`` with the same ``search.storage`` and model files). Concurrent trials
share the CPU, so their timings are noisier than one worker's: use it to explore, the DVC stage to
report.
"""

from __future__ import annotations

import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.stages import (
    check_checkout,
    check_overrides,
    checkout_outputs,
    default_study_storage,
    join_search,
    queue_trials,
    search_inputs,
    search_outputs,
    search_results,
)
from tasks.workspace import pinned_worktree


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def search_markdown(results: dict, line: str, commit: str, storage: str) -> str:
    """The artifact: the chosen schedule, the Pareto front, the commit and the (masked) storage."""
    from esolm.report import markdown_table

    best, front = results["best"], results["pareto"]
    budget = best.get("time_budget") or 0
    if best.get("trial") is None:
        chosen = "no feasible trial: lower search.entropy_floor_frac or add trials"
    else:
        chosen = (f"trial {best['trial']}: gen ppl {_number(best['gen_ppl'])}, {_number(best['seconds'])} s/sample "
                  f"({f'within {budget} s/sample' if budget else 'the knee of the front'})\n\n"
                  f"`{json.dumps(best.get('searched') or best.get('schedule'), sort_keys=True)}`")
    rows = [(p["trial"], _number(p["gen_ppl"]), _number(p["seconds"]), p.get("nfe"), json.dumps(p["params"]))
            for p in front.get("front", [])]
    table = markdown_table(["trial", "gen_ppl", "s/sample", "nfe", "schedule"], rows)
    comparison = front.get("comparison") or {}
    hv = (f"\n\nhypervolume: searched {_number(comparison['hypervolume_searched'])}, default schedule "
          f"{_number(comparison['hypervolume_default'])}" if "hypervolume_searched" in comparison else "")
    return (f"# esolm schedule search ({front.get('variant')})\n\n{line}\n\n## Chosen schedule\n\n{chosen}\n\n"
            f"## Pareto front ({len(rows)} trials, entropy floor {_number(front.get('entropy_floor'))} nats)\n\n"
            f"{table}{hv}\n\ncommit `{commit}`, storage `{storage}`\n")


@flow(name="esolm-schedule-search", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def schedule_search(repo: str = ".", workers: int = 2, n_trials: int | None = None,
                    sets: list[str] | None = None, revision: str | None = None) -> dict:
    """Fill the study up to ``n_trials`` trials in total (default: search.n_trials) with
    ``workers`` concurrent worker processes in a worktree of ``repo`` at ``revision``, then write
    the outputs there and publish them (artifact ``esolm-search``)."""
    from esolm.search.config import mask_url

    check_checkout(repo)
    sets = list(sets or [])
    if n_trials:  # every worker fills the study up to the same total (esolm search --only join)
        sets.append(f"search.n_trials={n_trials}")
    check_overrides(repo, sets)
    with pinned_worktree(repo, revision, name="search") as (work, commit):
        inputs = search_inputs(str(work), sets)
        storage = inputs["storage"] or default_study_storage(repo, inputs["out_dir"])
        if not inputs["storage"]:  # the checkout's study file, not the worktree's
            sets.append(f"search.storage={json.dumps(storage)}")
        checkout_outputs(str(work), inputs["needs"], commit)
        queued = queue_trials(str(work), n_trials, sets)
        futures = [join_search.submit(str(work), sets) for _ in range(workers)]
        ran = sum(f.result() for f in futures)
        line = search_outputs(str(work), sets)
        results = search_results(str(work), inputs["out_dir"])
    shown = mask_url(storage)
    create_markdown_artifact(search_markdown(results, line, commit, shown), key="esolm-search",
                             description="the schedule search: chosen schedule and Pareto front")
    print(f"queued {queued}, ran {ran} trials; {line}")
    return {"queued": queued, "ran": ran, "summary": line, "best": results["best"],
            "front": len(results["pareto"].get("front", [])), "commit": commit, "storage": shown}


if __name__ == "__main__":
    schedule_search()
