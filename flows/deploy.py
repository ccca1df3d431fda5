"""Serve the pipeline on a cron schedule so it shows, and can be triggered, in the Prefect UI.

    prefect server start                      # terminal 1 (dashboard on http://127.0.0.1:4200)
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy --cron "0 3 * * *" # terminal 2: keeps serving until stopped
"""

from __future__ import annotations

import argparse

from flows.pipeline import pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cron", default="0 3 * * *", help="when to run (default: every day at 03:00)")
    p.add_argument("--name", default="esolm-nightly", help="deployment name")
    p.add_argument("--repo", default=".", help="the esolm checkout to run in")
    args = p.parse_args()
    pipeline.serve(name=args.name, cron=args.cron, parameters={"repo": args.repo},
                   description="The esolm study: dvc repro of every stage, then the headline table.")


if __name__ == "__main__":
    main()
