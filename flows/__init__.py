"""Prefect flows: the pipeline, experiments and sweeps, the schedule search, deployments."""
