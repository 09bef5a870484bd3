"""The end-to-end flow: the stage graph of `llmpipe.stages`, submitted as a DAG of Prefect tasks.

Each stage task waits for the tasks of the stages it reads from, so Prefect records the edges
(its UI draws the graph) and stages of independent branches run at once, up to
`run.max_parallel_stages` threads. A failed stage fails the flow, after the other branches
have finished and kept their results.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.context import get_run_context
from prefect.deployments.runner import EntrypointType
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from llmpipe import config as configlib
from llmpipe import stages
from llmpipe.locks import run_lock
from tasks.stage import report, stage_options
from tasks.tracking import pipeline_run, require_prefect_server


@flow(name="llmpipe")
def pipeline(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None,
             until: list[str] | str | None = None, only: str | None = None, force: list[str] | None = None) -> dict:
    config = configlib.load(config_path, overrides or [], run_dir)
    names = stages.plan_stages(config, until, only)
    external = stages.external_fingerprints(config, names)  # each config-given input hashed once per run
    flow_run_id = str(get_run_context().flow_run.id)
    with run_lock(config.run_dir), pipeline_run(config, flow_run_id) as tracking:
        with ThreadPoolTaskRunner(max_workers=config.run.max_parallel_stages) as runner:
            futures = {}
            for name in names:
                upstream = [futures[dep] for dep in stages.get_stage(name).dependencies(config) if dep in futures]
                futures[name] = runner.submit(stage_options(name, config, force=name in (force or [])),
                                              {"name": name, "config": config, "external": external,
                                               "tracking": tracking}, wait_for=upstream)
            by_future = {future: name for name, future in futures.items()}
            statuses = {by_future[future]: report(by_future[future], future, config, tracking)
                        for future in as_completed(list(futures.values()))}
        statuses = {name: statuses[name] for name in names}
        failed = [name for name, status in statuses.items() if status == "failed"]
        if failed:
            raise stages.StagesFailed(failed, config.run_dir)
    return {"stages": statuses, "flow_run_id": flow_run_id, "mlflow_run_id": tracking["parent_run_id"]}


def serve(parameters: dict, name: str, cron: str) -> None:
    """Register a cron deployment of the pipeline and serve it from this process (blocks)."""
    require_prefect_server()
    pipeline.serve(name=name, cron=cron, parameters=parameters)


def deploy(parameters: dict, name: str, pool: str, cron: str | None) -> UUID:
    """Register a deployment on a work pool; its workers start each run (a process pool here, a
    Kubernetes or Slurm-backed pool on a cluster). The flow is found by module path, so a worker
    needs llmpipe installed (or on PYTHONPATH), not a copy of this folder; it runs in this directory."""
    require_prefect_server()
    return pipeline.deploy(name=name, work_pool_name=pool, cron=cron, build=False, push=False,
                           entrypoint_type=EntrypointType.MODULE_PATH, print_next_steps=False,
                           job_variables={"working_dir": str(Path.cwd())}, parameters=parameters)
