"""One Prefect task runs any stage; the stage's cache key decides whether it runs at all.

The key is the stage's config hash + its inputs' fingerprints + its code version
(`llmpipe.stages.cache_key`), so a rerun with nothing changed is served from the persisted
result under `<run_dir>/<stage>/.prefect/`, and a stage that crashed or was killed has no
result there and runs again. Prefect's default cache policy includes the flow run id and would
never resume; this one does not.
"""

from __future__ import annotations

from prefect import task
from prefect.context import get_run_context

from llmpipe import stages
from llmpipe.config import RunConfig
from llmpipe.paths import RunDir
from llmpipe.tracking import MlflowTracker

RETRIES = {"crawl": 2}  # network stages retry; deterministic ones fail fast


def _cache_key(context, parameters) -> str:
    return parameters["cache_key"]


@task(cache_key_fn=_cache_key, persist_result=True, task_run_name="{name}")
def stage_task(name: str, config: RunConfig, cache_key: str, tracking: dict) -> dict:
    """Run one stage inside its own MLflow child run; return what downstream and the cache need."""
    task_run = get_run_context().task_run
    tracker = MlflowTracker(tracking["uri"], tracking["experiment_id"], run_name=name,
                            parent_run_id=tracking["parent_run_id"],
                            tags={"llmpipe.stage": name, "llmpipe.cache_key": cache_key, "llmpipe.cached": "false",
                                  "prefect.flow_run_id": str(task_run.flow_run_id),
                                  "prefect.task_run_id": str(task_run.id)})
    try:
        manifest = stages.execute(name, config, tracker)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.set_tags({"llmpipe.fingerprint": manifest["fingerprint"], "llmpipe.code_version": manifest["code_version"]})
    tracker.close()
    return {"stage": name, "fingerprint": manifest["fingerprint"], "cache_key": cache_key,
            "mlflow_run_id": tracker.run_id, "counts": manifest["counts"]}


def run_stage(name: str, config: RunConfig, tracking: dict, force: bool = False) -> str:
    """Call the stage task with its cache key; record a cache hit in MLflow. Returns 'ran' or 'cached'."""
    key = stages.cache_key(stages.STAGES[name], config)
    refresh = force or not stages.is_current(name, config, key)  # outputs on disk must match the cache
    state = stage_task.with_options(
        result_storage=RunDir(config.run_dir).prefect_results(name),
        refresh_cache=refresh,
        retries=RETRIES.get(name, 0),
    )(name, config, key, tracking, return_state=True)
    result = state.result()  # raises if the stage failed
    if state.name != "Cached":
        return "ran"
    cached = MlflowTracker(tracking["uri"], tracking["experiment_id"], run_name=f"{name} (cached)",
                           parent_run_id=tracking["parent_run_id"],
                           tags={"llmpipe.stage": name, "llmpipe.cache_key": key, "llmpipe.cached": "true",
                                 "llmpipe.fingerprint": result["fingerprint"],
                                 "llmpipe.source_run_id": result["mlflow_run_id"],
                                 "prefect.flow_run_id": str(get_run_context().flow_run.id)})
    cached.close()
    return "cached"
