"""The schedule search with trials running concurrently as Prefect tasks against one study.

Optuna's SQLite storage takes several writers; each task runs a share of the trials in its
own thread and model copy. Concurrent trials share the CPU, so their timings are noisier
than the DVC stage's sequential ones: use it to explore, the stage to report.
"""

from __future__ import annotations

import os

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner


@task(retries=1, retry_delay_seconds=5)
def run_trials(repo: str, n_trials: int, sets: list[str]) -> int:
    from esolm.params import load_params
    from esolm.stages import search_trials

    os.chdir(repo)
    return search_trials(load_params("params.yaml", sets), n_trials)


@task
def write_search_outputs(repo: str, sets: list[str]) -> dict:
    from esolm.params import load_params
    from esolm.stages import search_outputs

    os.chdir(repo)
    out = search_outputs(load_params("params.yaml", sets))
    return {"trials": out["trials"], "front": len(out["front"]), "best": out["best"]}


@flow(name="esolm-schedule-search", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def schedule_search(repo: str = ".", workers: int = 2, trials_per_worker: int = 3,
                    sets: list[str] | None = None) -> dict:
    """``workers`` concurrent tasks; the study grows by ``workers x trials_per_worker`` trials."""
    from esolm.params import build, load_params, section
    from esolm.search import SearchConfig, open_study

    sets = list(sets or [])
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        values = {k: v for k, v in section(load_params("params.yaml", sets), "search").items() if k != "device"}
        sc = build(SearchConfig, values, "search")
        have = len(open_study(sc, f"schedule-{sc.variant}").trials)
    finally:
        os.chdir(cwd)
    futures = [run_trials.submit(repo, have + (i + 1) * trials_per_worker, sets) for i in range(workers)]
    ran = sum(f.result() for f in futures)
    summary = write_search_outputs(repo, sets)
    print(f"ran {ran} trials; {summary['trials']} in the study, {summary['front']} on the front")
    return summary


if __name__ == "__main__":
    schedule_search()
