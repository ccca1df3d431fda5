"""The schedule search with its trials spread over concurrent worker processes (Prefect tasks).

The first task queues exactly the trials missing from the model's study; each worker task runs
``esolm search --only join`` in its own process (own GIL and model copy), running trials until
the study holds ``n_trials`` counted trials; the last task writes the outputs from every trial. Workers on
other machines can join the same study (``esolm search --only join`` with the same
``search.storage`` and model file). Concurrent trials share the CPU, so their timings are
noisier than one worker's: use it to explore, the DVC stage to report.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.stages import check_overrides, join_search, queue_trials, search_outputs


@flow(name="esolm-schedule-search", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def schedule_search(repo: str = ".", workers: int = 2, n_trials: int | None = None,
                    sets: list[str] | None = None) -> dict:
    """Fill the study up to ``n_trials`` trials in total (default: search.n_trials) with
    ``workers`` concurrent worker processes, then write the outputs."""
    sets = list(sets or [])
    if n_trials:  # every worker fills the study up to the same total (esolm search --only join)
        sets.append(f"search.n_trials={n_trials}")
    check_overrides(repo, sets)
    queued = queue_trials(repo, n_trials, sets)
    futures = [join_search.submit(repo, sets) for _ in range(workers)]
    ran = sum(f.result() for f in futures)
    summary = search_outputs(repo, sets)
    print(f"queued {queued}, ran {ran} trials; {summary}")
    return {"queued": queued, "ran": ran, "summary": summary}


if __name__ == "__main__":
    schedule_search()
