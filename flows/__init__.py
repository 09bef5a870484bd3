"""Prefect flows: wiring of the tasks in tasks/, nothing else."""
