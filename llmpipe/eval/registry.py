"""The final chat model in MLflow's model registry, and the `champion` alias that follows the best one.

    model_uri = log_chat_model(uri, run_id, run_dir.stage("sft"), run_dir.tokenizer_dir)
    result = register_champion(uri, "llmpipe-chat", model_uri, "task_accuracy", 0.31)
    load_champion(uri, "llmpipe-chat").predict(["What is 2 + 3?"])  # -> one reply per prompt

The logged model is an MLflow pyfunc model: the release weights and the tokenizer as its
artifacts, `ChatPyfuncModel` as its code. Its replies are greedy and single-turn, what `llmpipe
chat --temperature 0` says to one user message with no system message, through the same
`answer` that SFT's task accuracy uses. Loading it needs llmpipe importable (it is pickled by
reference), as in the environment that logged it.

Each version is tagged `llmpipe.<metric>` with the value it was registered with; the alias moves
to a new version only when its value is strictly better than the champion's tag.

MLflow's model logging and `models:/` loading read the process-wide tracking and registry URIs
and the thread's active run; `log_chat_model` and `load_champion` set them for the call and put
them back afterwards (the environment variables that `mlflow.set_tracking_uri` writes included).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import mlflow.pyfunc
import pandas as pd

from llmpipe.errors import BadValue, MissingInput

CHAMPION = "champion"
DEFAULT_MAX_NEW_TOKENS = 64
_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class ChatPyfuncModel(mlflow.pyfunc.PythonModel):
    """Greedy replies of a release model: `predict` takes a DataFrame with a `prompt` column, a
    list of prompts or one prompt, and returns one reply per prompt."""

    def load_context(self, context) -> None:
        from llmpipe.alignment.render import ChatEncoder
        from llmpipe.model.release import load_release
        from llmpipe.tokenizer.train import load_tokenizer

        self.model = load_release(Path(context.artifacts["release"]))
        self.encoder = ChatEncoder(load_tokenizer(context.artifacts["tokenizer"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # pyfunc's schema check hands a DataFrame over; called directly, a list or a str will do too
        from llmpipe.alignment.answers import answer

        max_new_tokens = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        conversations = [[{"role": "user", "content": prompt}] for prompt in _prompts(model_input)]
        return answer(self.model, self.encoder, conversations, max_new_tokens)


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    return [str(p) for p in model_input]


def signature():
    """A `prompt` string column in, a reply string out; `max_new_tokens` as a parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]))


def _requirements() -> list[str]:
    """The packages loading the model imports, pinned to what is installed (listing them saves MLflow
    loading the model in a subprocess to find out). llmpipe itself is not on an index."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "tokenizers", "safetensors", "pydantic",
                                                     "numpy", "pandas")]


def _uri_of(client_or_uri) -> str:
    return client_or_uri if isinstance(client_or_uri, str) else client_or_uri.tracking_uri


@contextmanager
def _using_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri`, and restored afterwards.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into the environment and
    `set_tracking_uri(None)` deletes it, so the variables are put back as they were too.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri  # None where never set
    saved_env = {name: os.environ.get(name) for name in _URI_VARIABLES}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _in_run(client, run_id: str) -> Iterator[None]:
    """`run_id` as this thread's active run, as `pyfunc.log_model` wants (it puts the model in the
    active run's experiment; with no run active it would use the Default experiment).

    Ending the fluent run marks it FINISHED; the run's status and end time are put back, so a
    run its owner is still logging to stays RUNNING.
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    before = client.get_run(run_id).info
    try:
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            yield
    finally:
        if before.status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=before.status, end_time=before.end_time)


def log_chat_model(client_or_uri, run_id: str, release_dir: Path, tokenizer_dir: Path,
                   artifact_path: str = "chat_model") -> str:
    """Log the release in `release_dir` with the tokenizer in `tokenizer_dir` as a pyfunc model of
    run `run_id` (an MLflow 3 logged model named `artifact_path`); returns its `models:/<id>` URI."""
    from mlflow.tracking import MlflowClient

    from llmpipe.model.release import CONFIG, WEIGHTS, load_head
    from llmpipe.tokenizer.train import copy_tokenizer

    release_dir, tokenizer_dir = Path(release_dir), Path(tokenizer_dir)
    for name in (WEIGHTS, CONFIG):
        if not (release_dir / name).is_file():
            raise MissingInput(f"{release_dir / name} is missing (did the stage finish?)")
    if load_head(release_dir) != "lm":
        raise BadValue(f"{release_dir} holds a score model, which does not chat")
    uri = _uri_of(client_or_uri)
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        release, tokenizer = Path(tmp) / "release", Path(tmp) / "tokenizer"
        release.mkdir()
        tokenizer.mkdir()
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(release_dir / name, release / name)
        copy_tokenizer(tokenizer_dir, tokenizer)
        with _using_store(uri), _in_run(client, run_id), warnings.catch_warnings():
            # an input example would be run through the model at log time; the signature says enough
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=artifact_path, python_model=ChatPyfuncModel(),
                artifacts={"release": str(release), "tokenizer": str(tokenizer)},
                signature=signature(), pip_requirements=_requirements())
    return info.model_uri


def register_champion(uri: str, model_name: str, model_uri: str, metric_name: str, metric_value: float,
                      higher_is_better: bool = True) -> dict:
    """Register `model_uri` as a new version of `model_name`, tagged `llmpipe.<metric_name>`, and
    point the `champion` alias at it when there is no champion or its value is strictly better."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model_name)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    run_id = client.get_logged_model(model_id).source_run_id if model_id else None
    tag = f"llmpipe.{metric_name}"
    value = float(metric_value)
    with _using_store(uri):  # the SQLite registry looks the logged model up through the global tracking URI
        version = client.create_model_version(model_name, source=model_uri, run_id=run_id, model_id=model_id,
                                              tags={tag: repr(value)}).version
    champion = _champion(client, model_name)
    champion_value = None
    if champion is None:
        promoted, reason = True, "first version: no champion yet"
    elif tag not in champion.tags:
        promoted, reason = True, f"champion v{champion.version} has no {metric_name} tag"
    else:
        champion_value = float(champion.tags[tag])
        better = value > champion_value if higher_is_better else value < champion_value
        sign = (">" if higher_is_better else "<") if better else ("<=" if higher_is_better else ">=")
        promoted = better
        reason = f"{metric_name} {value:.4g} {sign} champion v{champion.version}'s {champion_value:.4g}"
        if not better:
            reason += ": champion stays"
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, str(version))
    return {"model_name": model_name, "version": int(version),
            "champion_version": int(version) if promoted else int(champion.version),
            "promoted": promoted, "reason": reason, "metric": metric_name, "value": value,
            "champion_value": champion_value}


def _champion(client, model_name: str):
    """The version the `champion` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def load_champion(uri: str, model_name: str):
    """The pyfunc model that `model_name@champion` points at."""
    with _using_store(uri):
        return mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")
