"""The chat model in MLflow's registry: logged to a stage's run as a pyfunc model, loaded back by
the `champion` alias and answering as `answer` does on the same weights, the alias moving only
to a strictly better version. A real SQLite store, made once for the module."""

from __future__ import annotations

import os

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from model_fixtures import MODEL, write_tokenizer

from llmpipe.alignment.answers import answer
from llmpipe.alignment.render import ChatEncoder
from llmpipe.config import ModelSection
from llmpipe.errors import BadValue
from llmpipe.eval.evaluate import champion_candidate
from llmpipe.eval.registry import DEFAULT_MAX_NEW_TOKENS, load_champion, log_chat_model, register_champion
from llmpipe.model import Transformer
from llmpipe.model.release import load_release, save_release
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.tracking import EXPERIMENT, EXPERIMENT_TAGS, MlflowTracker, init_store

PROMPTS = ["hello world", "the lazy dog", "def f(x): return"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with the llmpipe experiment, a release and a tokenizer, and one chat model logged to
    a run that is still running (the stage's own tracker owns it)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = init_store(uri, root)
    torch.manual_seed(0)
    save_release(Transformer(ModelSection(**MODEL)), root / "sft")
    write_tokenizer(root / "tokenizer")
    tracker = MlflowTracker(uri, experiment_id, run_name="sft")
    model_uri = log_chat_model(uri, tracker.run_id, root / "sft", root / "tokenizer")
    yield {"root": root, "uri": uri, "experiment_id": experiment_id, "run_id": tracker.run_id,
           "model_uri": model_uri, "client": MlflowClient(uri)}
    tracker.close()


def _direct_answers(root, prompts, max_new_tokens):
    model = load_release(root / "sft")
    encoder = ChatEncoder(load_tokenizer(root / "tokenizer"))
    return answer(model, encoder, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)


def test_the_champion_answers_as_answer_does_on_the_same_weights(store):
    result = register_champion(store["uri"], "chat-a", store["model_uri"], "task_accuracy", 0.25)
    assert result["promoted"] and result["version"] == result["champion_version"] == 1
    mlflow.set_tracking_uri(store["uri"])
    try:
        loaded = mlflow.pyfunc.load_model("models:/chat-a@champion")
    finally:
        mlflow.set_tracking_uri(None)
    expected = _direct_answers(store["root"], PROMPTS, 12)
    assert all(isinstance(reply, str) for reply in expected) and len(expected) == len(PROMPTS)
    assert loaded.predict(PROMPTS, params={"max_new_tokens": 12}) == expected
    assert loaded.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 12}) == expected
    assert loaded.predict(PROMPTS[1], params={"max_new_tokens": 12}) == expected[1:2]
    default = load_champion(store["uri"], "chat-a").predict(PROMPTS[:1])  # no params: the default length
    assert default == _direct_answers(store["root"], PROMPTS[:1], DEFAULT_MAX_NEW_TOKENS)


def test_the_alias_moves_only_to_a_strictly_better_version(store):
    uri, model_uri, client = store["uri"], store["model_uri"], store["client"]
    first = register_champion(uri, "chat-b", model_uri, "task_accuracy", 0.25)
    assert first["reason"] == "first version: no champion yet" and first["champion_value"] is None
    worse = register_champion(uri, "chat-b", model_uri, "task_accuracy", 0.2)
    assert (worse["version"], worse["champion_version"], worse["promoted"]) == (2, 1, False)
    assert worse["reason"] == "task_accuracy 0.2 <= champion v1's 0.25: champion stays"
    equal = register_champion(uri, "chat-b", model_uri, "task_accuracy", 0.25)
    assert not equal["promoted"] and str(client.get_model_version_by_alias("chat-b", "champion").version) == "1"
    better = register_champion(uri, "chat-b", model_uri, "task_accuracy", 0.31)
    assert (better["version"], better["champion_version"], better["promoted"]) == (4, 4, True)
    assert better["reason"] == "task_accuracy 0.31 > champion v1's 0.25"
    assert better | {"reason": None} == {"model_name": "chat-b", "version": 4, "champion_version": 4, "promoted": True,
                                         "reason": None, "metric": "task_accuracy", "value": 0.31,
                                         "champion_value": 0.25}
    champion = client.get_model_version_by_alias("chat-b", "champion")
    assert str(champion.version) == "4" and champion.tags["llmpipe.task_accuracy"] == "0.31"
    assert champion.run_id == store["run_id"] and champion.source == model_uri  # (SQLite keeps no model_id)
    assert [v.tags["llmpipe.task_accuracy"] for v in client.search_model_versions("name='chat-b'",
                                                                                 order_by=["version_number"])] \
        == ["0.25", "0.2", "0.25", "0.31"]


def test_lower_is_better_for_a_loss(store):
    uri, model_uri = store["uri"], store["model_uri"]
    register_champion(uri, "chat-c", model_uri, "bpb", 1.5, higher_is_better=False)
    worse = register_champion(uri, "chat-c", model_uri, "bpb", 1.6, higher_is_better=False)
    assert not worse["promoted"] and worse["reason"] == "bpb 1.6 >= champion v1's 1.5: champion stays"
    better = register_champion(uri, "chat-c", model_uri, "bpb", 1.4, higher_is_better=False)
    assert better["promoted"] and better["reason"] == "bpb 1.4 < champion v1's 1.5"


def test_the_model_belongs_to_the_run_and_the_globals_are_put_back(store):
    client, run_id = store["client"], store["run_id"]
    logged = client.get_logged_model(store["model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.experiment_id == store["experiment_id"]
    assert logged.name == "chat_model"
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # its tracker still owns it
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    assert logged.artifact_location.startswith((store["root"] / "mlartifacts").as_uri())
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id, "artifacts/release")} | \
        {a.path for a in client.list_logged_model_artifacts(logged.model_id, "artifacts/tokenizer")}
    assert {"artifacts/release/model.safetensors", "artifacts/release/model_config.json",
            "artifacts/tokenizer/tokenizer.json"} <= files and "artifacts/tokenizer/manifest.json" not in files
    assert mlflow.active_run() is None
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ

    # a finished run keeps its status and end time; an outer tracking URI and active run survive
    finished = client.create_run(store["experiment_id"], run_name="dpo")
    client.set_terminated(finished.info.run_id, end_time=1_000)
    outer = f"sqlite:///{store['root'] / 'elsewhere.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = outer
    try:
        log_chat_model(client, finished.info.run_id, store["root"] / "sft", store["root"] / "tokenizer", "dpo_model")
        assert os.environ["MLFLOW_TRACKING_URI"] == outer and mlflow.get_tracking_uri() == outer
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    info = client.get_run(finished.info.run_id).info
    assert (info.status, info.end_time) == ("FINISHED", 1_000)
    assert not (store["root"] / "elsewhere.db").exists()


def test_a_score_model_is_not_logged_as_a_chat_model(store, tmp_path):
    save_release(Transformer(ModelSection(**MODEL), head="score"), tmp_path / "rm")
    with pytest.raises(BadValue, match="score model"):
        log_chat_model(store["uri"], store["run_id"], tmp_path / "rm", store["root"] / "tokenizer")


def test_the_experiment_opens_on_training_runs(store):
    client, experiment_id = store["client"], store["experiment_id"]
    assert EXPERIMENT_TAGS == {"mlflow.experimentKind": "custom_model_development"}
    assert client.get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"
    client.delete_experiment_tag(experiment_id, "mlflow.experimentKind")  # a store made before the tag
    assert init_store(store["uri"], store["root"]) == experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "finetuning")  # someone's choice stays
    init_store(store["uri"], store["root"])
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


def test_the_candidate_is_the_best_chat_model_and_the_earlier_one_on_a_tie():
    checkpoints = {"pretrain": {"task_accuracy": 0.9}, "sft": {"task_accuracy": 0.1}, "dpo": {"task_accuracy": 0.05},
                   "ppo": {"task_accuracy": 0.1}, "reward": {"pairwise_accuracy": 0.7}}
    assert champion_candidate(checkpoints, "task_accuracy") == "sft"  # the base model does not chat
    checkpoints["ppo"]["task_accuracy"] = 0.2
    assert champion_candidate(checkpoints, "task_accuracy") == "ppo"
    checkpoints["ppo"]["task_accuracy"] = float("nan")
    assert champion_candidate(checkpoints, "task_accuracy") == "sft"
    assert champion_candidate({"pretrain": {"task_accuracy": 0.9}}, "task_accuracy") is None


def test_metric_changes_name_each_metric_and_its_change_against_each_run():
    from llmpipe.lineage import metric_changes

    table = metric_changes({"sft.val_bpb": 1.5, "ppo.task_accuracy": 0.25},
                           {"previous run": ("r1", {"sft.val_bpb": 1.75}), "champion": ("m v2", {"sft.val_bpb": 1.25,
                                                                                            "ppo.task_accuracy": 0.5})})
    assert "| ppo.task_accuracy | 0.25 | - | - | 0.5 | -0.25 |" in table
    assert "| sft.val_bpb | 1.5 | 1.75 | -0.25 | 1.25 | +0.25 |" in table
    assert "- previous run: r1" in table and "- champion: m v2" in table
