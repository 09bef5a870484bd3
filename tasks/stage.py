"""One Prefect task runs any stage; the stage's cache key decides whether it runs at all.

The key is the stage's config hash + its inputs' fingerprints + its code version
(`llmpipe.stages.cache_key`). Prefect computes it in the task's own thread once the upstream
tasks have finished, since it reads their manifests. A rerun with nothing changed is served from
the persisted result under `<run_dir>/<stage>/.prefect/`; a stage that crashed or was killed has
no result there and runs again. Prefect's default cache policy includes the flow run id and would
never resume; this one does not.
"""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import MarkdownArtifact, TableArtifact
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.transactions import get_transaction

from llmpipe import console, stages
from llmpipe.config import RunConfig
from llmpipe.errors import UserError
from llmpipe.paths import RunDir
from llmpipe.tracking import MlflowTracker, tracking_uri
from tasks.tracking import publish_report

RETRIES = {"crawl": 2}  # network stages retry; deterministic ones fail fast


def _not_the_users_error(task, task_run, state) -> bool:
    """Retry a failure the network may not repeat; a user's error (a crawl that kept no page) would."""
    try:
        state.result()
    except UserError:
        return False
    except BaseException:
        return True
    return True


def _cache_key(context, parameters) -> str:
    """The stage's key. A persisted result whose outputs are no longer on disk (the stage was since
    rerun alone with another config, or killed while resuming) is dropped, so the stage runs."""
    name, config = parameters["name"], parameters["config"]
    key = stages.cache_key(stages.get_stage(name), config, external=parameters["external"])
    if not stages.is_current(name, config, key):
        (RunDir(config.run_dir).prefect_results(name) / key).unlink(missing_ok=True)  # Prefect's file for that key
    return key


def _say_cached(task, task_run, state) -> None:
    """A cache hit's terminal line, from the task's own thread: printed before the stages that wait
    for this one can start and print theirs (the flow's report comes after, in any order)."""
    if state.name == "Cached":
        result = state.result()
        stage = stages.get_stage(result["stage"])
        console.stage_line(stage.name, "cached", details=console.format_counts(result["counts"], stage.summary))


@task(cache_key_fn=_cache_key, persist_result=True, task_run_name="{name}", on_completion=[_say_cached])
def stage_task(name: str, config: RunConfig, external: dict[str, str], tracking: dict) -> dict:
    """Run one stage inside its own MLflow child run; return what downstream and the cache need."""
    task_run, key = get_run_context().task_run, get_transaction().key
    if key is None:  # Prefect runs the task uncached when the key function raised: raise it here instead
        key = stages.cache_key(stages.get_stage(name), config, external=external)
    tracker = MlflowTracker(tracking_uri(config.run_dir.parent), tracking["experiment_id"], run_name=name,
                            parent_run_id=tracking["parent_run_id"],
                            tags={"llmpipe.stage": name, "llmpipe.cache_key": key, "llmpipe.cached": "false",
                                  "prefect.flow_run_id": str(task_run.flow_run_id),
                                  "prefect.task_run_id": str(task_run.id)})
    try:
        run = stages.execute(name, config, tracker, external)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    return {"stage": name, "fingerprint": run.manifest["fingerprint"], "cache_key": key,
            "mlflow_run_id": tracker.run_id, "counts": run.counts, "wall_time_s": run.wall_time_s}


def stage_options(name: str, config: RunConfig, force: bool):
    """The stage task as this stage runs it: its results inside its folder, its retries, forced or not."""
    return stage_task.with_options(result_storage=RunDir(config.run_dir).prefect_results(name),
                                   refresh_cache=True if force else None, retries=RETRIES.get(name, 0),
                                   retry_condition_fn=_not_the_users_error)


def report(name: str, future: PrefectFuture, config: RunConfig, tracking: dict) -> str:
    """After a stage task ended: its counts as a Prefect artifact and a cache hit as an MLflow run (the
    terminal lines come from the task's thread). Returns 'ran', 'cached', 'failed' or 'not run'."""
    future.wait()  # sets the future's final state (the API's copy may lag behind)
    state = future.state
    if state.is_failed() or state.is_crashed():
        return "failed"
    if not state.is_completed():  # an upstream stage failed
        console.stage_line(name, "not run: an upstream stage failed")
        return "not run"
    result = state.result()
    cached = state.name == "Cached"
    if cached:
        MlflowTracker(tracking_uri(config.run_dir.parent), tracking["experiment_id"], run_name=f"{name} (cached)",
                      parent_run_id=tracking["parent_run_id"],
                      tags={"llmpipe.stage": name, "llmpipe.cache_key": result["cache_key"], "llmpipe.cached": "true",
                            "llmpipe.fingerprint": result["fingerprint"],
                            "llmpipe.source_run_id": result["mlflow_run_id"],
                            "prefect.flow_run_id": str(get_run_context().flow_run.id)}).close()
    # the Prefect UI's account of this flow run: every stage's counts, cached or not
    TableArtifact(key=re.sub(r"[^a-z0-9-]+", "-", f"{config.run.name}-{name}".lower()),
                  table=[{"count": k, "value": v} for k, v in result["counts"].items()],
                  description=f"**{name}** {'cached' if cached else 'ran'} in {result['wall_time_s']:.1f}s "
                              f"(cache key {result['cache_key'][:12]})",
                  task_run_id=future.task_run_id, flow_run_id=get_run_context().flow_run.id).create()
    if name == "eval":  # the report card: on the flow's MLflow run and in the Prefect UI
        markdown = publish_report(config, tracking)
        MarkdownArtifact(key=re.sub(r"[^a-z0-9-]+", "-", f"{config.run.name}-report".lower()), markdown=markdown,
                         description=f"report card of run {config.run.name}",
                         flow_run_id=get_run_context().flow_run.id).create()
    return "cached" if cached else "ran"
