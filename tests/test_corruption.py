"""Corruption is detected, never used: a manifest edited by hand or cut short, truncated weights.
(A flipped byte in a shard or in the reference cache, a partial checkpoint: test_shard,
test_post_training, test_pretrain.)"""

from __future__ import annotations

import json

import pytest
import torch

from llmpipe import config as configlib
from llmpipe import io, stages
from llmpipe.config import ModelSection
from llmpipe.model.model import Transformer
from llmpipe.model.release import WEIGHTS, load_release, save_release
from llmpipe.paths import RunDir


@pytest.fixture
def tokenized(tmp_path, corpus_dir):
    """A run directory whose tokenizer stage finished; the shard stage reads it."""
    config_path = tmp_path / "t.yaml"
    config_path.write_text(configlib.to_yaml({"run": {"name": "t"}, "tokenizer": {"vocab_size": 300, "input": str(corpus_dir)},
                                              "shard": {"input": str(corpus_dir), "seq_len": 64}}))
    config = configlib.load(config_path, run_dir=tmp_path / "runs" / "t")
    stages.execute("tokenizer", config)
    return config_path, config


@pytest.mark.parametrize("edit", ["changed", "cut_short"])
def test_a_manifest_edited_by_hand_stops_the_stage_reading_it_and_is_rebuilt_by_the_flow(tokenized, capsys, monkeypatch, tmp_path, edit):
    from llmpipe.cli import main

    config_path, config = tokenized
    manifest = RunDir(config.run_dir).manifest("tokenizer")
    key = json.loads(manifest.read_text())["cache_key"]
    assert stages.is_current("tokenizer", config, key)
    if edit == "changed":
        tree = json.loads(manifest.read_text())
        tree["counts"]["documents"] += 1
        manifest.write_text(json.dumps(tree, indent=2))
    else:
        manifest.write_bytes(manifest.read_bytes()[:-40])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    capsys.readouterr()

    assert main(["shard", "--config", str(config_path), "--run-dir", str(config.run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow may say it made the store first)
    why = "was changed after its stage wrote it" if edit == "changed" else "is not valid JSON"
    assert err == (f"llmpipe shard: {manifest} {why}{' (its content does not match its sha256)' if edit == 'changed' else ' (edited by hand, or cut short)'}"
                   "; rebuild it with `llmpipe run ... --force tokenizer`")
    assert not stages.is_current("tokenizer", config, key)  # in a flow run the tokenizer is rebuilt, not trusted


def test_truncated_release_weights_are_never_loaded(tmp_path):
    folder = tmp_path / "runs" / "t" / "pretrain"
    cfg = ModelSection(vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=16)
    torch.manual_seed(0)
    save_release(Transformer(cfg), folder)
    io.write_manifest(folder, {"stage": "pretrain", "files": {
        name: {"sha256": io.sha256_file(folder / name)} for name in (WEIGHTS, "model_config.json")}})
    load_release(folder)
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(io.ChecksumError, match=r"model\.safetensors: expected sha256 .*rebuild it with `llmpipe run \.\.\. --force pretrain`$"):
        load_release(folder)


def test_a_shard_listed_in_the_manifest_but_deleted_is_one_line_naming_the_rebuild(tmp_path):
    from model_fixtures import write_shards

    from llmpipe.data.shards import load_split

    folder = write_shards(tmp_path / "runs" / "t" / "shard")
    (folder / "train_00001.arrow").unlink()
    with pytest.raises(io.ChecksumError, match=r"train_00001\.arrow: listed in its stage's manifest but missing; "
                                               r"rebuild it with `llmpipe run \.\.\. --force shard`$"):
        load_split(folder, "train")
