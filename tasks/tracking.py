"""The flow-level MLflow run (the parent of every stage run) and Prefect server checks."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

from llmpipe import lineage, tracking
from llmpipe.config import RunConfig
from llmpipe.errors import UserError
from llmpipe.paths import RunDir
from llmpipe.tracking import tracking_uri


@contextlib.contextmanager
def pipeline_run(config: RunConfig, flow_run_id: str) -> Iterator[dict]:
    """Open the parent MLflow run; yield what stage tasks need to attach their child runs."""
    runs_root = config.run_dir.parent
    uri = tracking_uri(runs_root)
    experiment_id = tracking.init_store(uri, runs_root)  # before any worker process touches the store
    parent = tracking.MlflowTracker(uri, experiment_id, run_name=f"{config.run.name} pipeline",
                                    tags={"llmpipe.run": config.run.name, "prefect.flow_run_id": flow_run_id,
                                          "llmpipe.run_dir": str(config.run_dir.resolve())})
    parent.log_params({"run.name": config.run.name, "run.seed": config.run.seed})
    previous = lineage.previous_run(parent.client, experiment_id, str(config.run_dir.resolve()), parent.run_id)
    if previous:  # a scheduled run links to the one before it; its report compares them
        parent.set_tags({lineage.PREVIOUS_RUN_TAG: previous})
    status = "FAILED"
    try:
        # what every stage task gets (as a Prefect parameter): no URI, which may carry a password
        yield {"experiment_id": experiment_id, "parent_run_id": parent.run_id}
        status = "FINISHED"
    finally:
        if config.run_dir.joinpath("config.yaml").is_file():
            parent.log_artifact(config.run_dir / "config.yaml")
        parent.close(status)


def require_prefect_server() -> None:
    """`serve` registers a deployment: that needs a real, running Prefect server."""
    import httpx

    url = os.environ.get("PREFECT_API_URL")
    hint = "start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
    if not url:
        raise UserError(f"no Prefect server configured (PREFECT_API_URL is unset): {hint}")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as err:
        raise UserError(f"no Prefect server reachable at {url} ({err.__class__.__name__}): {hint}") from None


def publish_report(config: RunConfig, tracking: dict) -> str:
    """The eval stage's report on the flow's MLflow run: its files as artifacts, its headline
    numbers as metrics, the champion as a tag. Returns the markdown (for the Prefect artifact)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_dir, run_id = RunDir(config.run_dir), tracking["parent_run_id"]
    client = MlflowClient(tracking_uri(config.run_dir.parent))
    card = json.loads(run_dir.report_json.read_text())
    for path in (run_dir.report_json, run_dir.report_md):
        client.log_artifact(run_id, str(path), "report")
    if (run_dir.eval_dir / "plots").is_dir():
        client.log_artifacts(run_id, str(run_dir.eval_dir / "plots"), "report/plots")
    metrics = {f"{name}.{key}": value for name, entry in card["checkpoints"].items() for key, value in entry.items()
               if isinstance(value, (int, float)) and value == value}  # NaN is no metric
    metrics["unigram_bpb"] = card["baselines"]["unigram_bpb"]
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    registry = card.get("registry") or {}
    if registry.get("registered"):
        client.set_tag(run_id, "llmpipe.champion", f"{registry['model_name']} v{registry['champion_version']}")
    against = {}
    previous = client.get_run(run_id).data.tags.get(lineage.PREVIOUS_RUN_TAG)
    if previous:
        against["previous run"] = (previous, client.get_run(previous).data.metrics)
    if registry.get("champion_version"):
        champion_run, champion = lineage.champion_metrics(client, registry["model_name"], registry["champion_version"])
        if champion_run and champion_run != run_id:
            against["champion"] = (f"{registry['model_name']} v{registry['champion_version']} (run {champion_run})",
                                   champion)
    markdown = run_dir.report_md.read_text()
    if against:  # the run's own comparison: on MLflow and in Prefect, not in the report file (same inputs, same bytes)
        changes = lineage.metric_changes(metrics, against)
        client.log_text(run_id, changes, "report/changes.md")
        markdown += "\n" + changes
    return markdown
