"""The end-to-end flow: crawl -> prepare -> tokenizer -> shard -> pretrain -> ..."""

from __future__ import annotations

from prefect import flow
from prefect.context import get_run_context

from llmpipe import config as configlib
from llmpipe.stages import plan_stages
from tasks.stage import run_stage
from tasks.tracking import pipeline_run


@flow(name="llmpipe", log_prints=True)
def pipeline(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None,
             until: str | None = None, force: list[str] | None = None) -> dict:
    config = configlib.load(config_path, overrides or [], run_dir)
    flow_run_id = str(get_run_context().flow_run.id)
    with pipeline_run(config, flow_run_id) as tracking:
        statuses = {name: run_stage(name, config, tracking, force=name in (force or []))
                    for name in plan_stages(config, until)}
    return {"stages": statuses, "flow_run_id": flow_run_id, "mlflow_run_id": tracking["parent_run_id"]}


def serve(config_path: str, overrides: list[str], run_dir: str | None, name: str, cron: str) -> None:
    """Register a cron deployment of the pipeline and serve it (blocks)."""
    from tasks.tracking import require_prefect_server

    require_prefect_server()
    pipeline.serve(name=name, cron=cron,
                   parameters={"config_path": config_path, "overrides": overrides, "run_dir": run_dir})
