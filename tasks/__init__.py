"""Prefect tasks: thin wrappers around one DVC command or one esolm library call each."""
