"""Experiment tracking: an MLflow adapter and a do-nothing tracker with the same methods.

The null tracker stands in on non-zero ranks, in tests of single stages and wherever tracking
is off. A worker process logs through a `FileTracker`, whose lines the stage process replays into
its MLflow run (importing MLflow would cost each worker about 3 s). The MLflow tracker talks to the store through `MlflowClient` with explicit run ids
(MLflow's "active run" is per thread, and Prefect may run tasks on other threads), and buffers
metrics: one `log_metric` round trip costs about 20 ms on SQLite.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

EXPERIMENT = "llmpipe"
# MLflow 3's UI opens an experiment of this kind on its training runs, not on the GenAI overview
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class Tracker(Protocol):
    uri: str | None  # where the run lives, for code that must reach MLflow itself
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
    # MLflow prints "View run ... at: <URI>" as a run ends: the URI with its password, if it has one
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not uri.startswith("sqlite:///"):
        return _init_experiment(uri, runs_root)
    from llmpipe.locks import exclusive

    database = Path(uri.removeprefix("sqlite:///"))
    with exclusive(database.with_name(database.name + ".lock")):  # two runs starting at once on a fresh store
        if not database.exists() and os.environ.get(TEMPLATES_ENV):
            _copy_fresh_store(Path(os.environ[TEMPLATES_ENV]), database)
        return _init_experiment(uri, runs_root)


TEMPLATES_ENV = "LLMPIPE_MLFLOW_TEMPLATES"


def _copy_fresh_store(templates: Path, database: Path) -> None:
    """A new SQLite store as a copy of an empty one that MLflow made and migrated (once per MLflow version,
    in `$LLMPIPE_MLFLOW_TEMPLATES`): the schema's ~1.5 s of migrations are paid once, not by every store.
    For test suites and CI, which make hundreds of stores; the copy is the same schema MLflow would make."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from llmpipe import io
    from llmpipe.locks import exclusive

    template = templates / f"mlflow-{mlflow.__version__}.db"
    with exclusive(template.with_name(template.name + ".lock")):
        if not template.is_file():
            with io.atomic_path(template) as staging:
                MlflowClient(f"sqlite:///{staging}").search_experiments()  # MLflow creates and migrates it
    with io.atomic_path(database) as staging:
        shutil.copyfile(template, staging)


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
        self.uri, self.client = uri, MlflowClient(uri)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
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
        self.client.set_terminated(self.run_id, status=status)


class FileTracker:
    """A worker's tracker: each call one JSON line in a file that the stage process, which owns the
    MLflow run, replays as it is written (`Replay`). `uri` and `run_id` name that run, for code
    that must reach MLflow itself (the eval stage logging a model)."""

    def __init__(self, path: str | Path, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self._file = open(path, "a", encoding="utf-8")

    def _write(self, *call) -> None:
        self._file.write(json.dumps(call, default=str) + "\n")  # one write per line: a reader never sees half
        self._file.flush()

    def log_params(self, params): self._write("log_params", params)
    def log_metrics(self, metrics, step=None): self._write("log_metrics", {k: float(v) for k, v in metrics.items()}, step)
    def log_artifact(self, path, artifact_path=None): self._write("log_artifact", str(path), artifact_path)
    def log_inputs(self, inputs): self._write("log_inputs", inputs)
    def set_tags(self, tags): self._write("set_tags", tags)

    def close(self, status="FINISHED"):
        self._file.close()  # the run's status is its owner's


class Replay:
    """Apply a FileTracker's lines to `tracker` while the worker writes them: `with Replay(path, tracker):`
    polls every `every_s` and once more at exit, so nothing written before the worker ended is lost."""

    def __init__(self, path: str | Path, tracker: Tracker, every_s: float = 1.0):
        self.path, self.tracker, self.every_s = Path(path), tracker, every_s
        self._offset, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tracking-replay", daemon=True)

    def __enter__(self) -> "Replay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line being written waits for the next poll
        self._offset += len(complete)
        for line in complete.splitlines():
            method, *args = json.loads(line)
            getattr(self.tracker, method)(*args)
