"""Experiment tracking: an MLflow adapter and a do-nothing tracker with the same methods.

The null tracker stands in on non-zero ranks, in tests of single stages and wherever tracking
is off. The MLflow tracker talks to the store through `MlflowClient` with explicit run ids
(MLflow's "active run" is per thread, and Prefect may run tasks on other threads), and buffers
metrics: one `log_metric` round trip costs about 20 ms on SQLite.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

EXPERIMENT = "llmpipe"
# MLflow 3's UI opens an experiment of this kind on its training runs, not on the GenAI overview
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class Tracker(Protocol):
    uri: str | None  # where the run lives, for processes that attach to it
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_inputs(self, inputs: dict[str, tuple[str, str]]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    uri = None
    run_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_inputs(self, inputs): pass
    def set_tags(self, tags): pass
    def close(self, status="FINISHED"): pass


def tracking_uri(runs_root: str | Path = "runs") -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite file beside the run directories."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def init_store(uri: str, runs_root: str | Path = "runs") -> str:
    """Create the store and the experiment once, before any worker process touches it.

    Concurrent first use of a fresh SQLite store races MLflow's schema migrations.
    Returns the experiment id.
    """
    if not uri.startswith("sqlite:///"):
        return _init_experiment(uri, runs_root)
    from llmpipe.locks import exclusive

    database = Path(uri.removeprefix("sqlite:///"))
    with exclusive(database.with_name(database.name + ".lock")):  # two runs starting at once on a fresh store
        return _init_experiment(uri, runs_root)


def _init_experiment(uri: str, runs_root: str | Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        for key, value in EXPERIMENT_TAGS.items():
            if key not in experiment.tags:  # a store made before the tag; a kind someone chose stays
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the database, not in the working directory
        artifacts = (Path(runs_root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=artifacts, tags=EXPERIMENT_TAGS)


class MlflowTracker:
    """One MLflow run. Metrics are buffered and sent with `log_batch`."""

    def __init__(self, uri: str, experiment_id: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, flush_every_s: float = 5.0):
        from mlflow.tracking import MlflowClient

        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        client = MlflowClient(uri)
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self._open(uri, client, run_id, owns_run=True, flush_every_s=flush_every_s)

    @classmethod
    def attach(cls, uri: str, run_id: str, flush_every_s: float = 5.0) -> "MlflowTracker":
        """Log to a run someone else created and will end: rank 0 of a torchrun job logs to its
        stage's run. `close` flushes but leaves the run's status to its owner."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.get_run(run_id)  # an unknown id fails here, not at the first metric
        tracker = cls.__new__(cls)
        tracker._open(uri, client, run_id, owns_run=False, flush_every_s=flush_every_s)
        return tracker

    def _open(self, uri: str, client, run_id: str, owns_run: bool, flush_every_s: float) -> None:
        self.uri, self.client, self.run_id, self.owns_run = uri, client, run_id, owns_run
        self._pending: list = []
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if len(self._pending) >= 500 or time.monotonic() - self._last_flush > self._flush_every_s:
            self.flush()

    def flush(self):
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_inputs(self, inputs):
        """Each input as an MLflow dataset: its source (a manifest or a folder) and its digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        datasets = [
            DatasetInput(Dataset(name=name, digest=digest[:36], source_type="local", source=source),
                         tags=[InputTag("mlflow.data.context", "input")])
            for name, (source, digest) in inputs.items()
        ]
        if datasets:
            self.client.log_inputs(self.run_id, datasets=datasets)

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def close(self, status="FINISHED"):
        self.flush()
        if self.owns_run:
            self.client.set_terminated(self.run_id, status=status)
