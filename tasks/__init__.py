"""Thin Prefect tasks over the llmpipe library: caching, retries, MLflow runs. No pipeline logic."""
