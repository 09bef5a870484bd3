"""The real Prefect engine and a real MLflow SQLite store: caching, resuming, lineage."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from processes import group_alive

from llmpipe import config as configlib
from llmpipe.tracking import EXPERIMENT, tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_overrides(corpus_dir):
    return [f"tokenizer.input={corpus_dir}", f"shard.input={corpus_dir}", "tokenizer.vocab_size=600",
            "model.vocab_size=600", "shard.seq_len=64", "shard.tokens_per_shard=4096", "run.name=flowtest"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs") / "flowtest"


def _run(run_dir, overrides, **kwargs):
    from flows.pipeline import pipeline

    return pipeline(config_path="configs/tiny.yaml", overrides=overrides, run_dir=str(run_dir), until="shard", **kwargs)


def _children(run_dir, parent_run_id):
    client = MlflowClient(tracking_uri(run_dir.parent))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {run.data.tags["llmpipe.stage"]: run for run in runs}


def test_first_run_executes_and_tracks_every_stage(run_dir, base_overrides):
    summary = _run(run_dir, base_overrides)
    assert summary["stages"] == {"tokenizer": "ran", "shard": "ran"}
    children = _children(run_dir, summary["mlflow_run_id"])
    shard = children["shard"]
    manifest = json.loads((run_dir / "shard" / "manifest.json").read_text())
    assert shard.data.params["shard.seq_len"] == "64"
    assert shard.data.metrics["train_tokens"] == manifest["counts"]["train_tokens"] > 0
    assert shard.data.tags["llmpipe.fingerprint"] == manifest["fingerprint"]
    assert shard.data.tags["prefect.flow_run_id"] == summary["flow_run_id"]
    assert shard.info.status == "FINISHED"
    # lineage: the shard run's input is the tokenizer's output, by digest
    inputs = {d.dataset.name: d.dataset.digest for d in shard.inputs.dataset_inputs}
    tokenizer_fp = json.loads((run_dir / "tokenizer" / "manifest.json").read_text())["fingerprint"]
    assert inputs["tokenizer"] == tokenizer_fp[:36]
    artifacts = MlflowClient(tracking_uri(run_dir.parent)).list_artifacts(shard.info.run_id)
    assert {"manifest.json", "shard.log"} <= {a.path for a in artifacts}


def test_second_run_skips_every_stage(run_dir, base_overrides):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.arrow")}
    summary = _run(run_dir, base_overrides)
    assert summary["stages"] == {"tokenizer": "cached", "shard": "cached"}
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.arrow")} == before
    children = _children(run_dir, summary["mlflow_run_id"])
    assert {name: run.data.tags["llmpipe.cached"] for name, run in children.items()} == {"tokenizer": "true", "shard": "true"}


def test_changing_shard_config_reruns_only_shard(run_dir, base_overrides, monkeypatch):
    from llmpipe import console

    terminal = io.StringIO()
    monkeypatch.setitem(console._terminal, "stdout", terminal)
    summary = _run(run_dir, [*base_overrides, "shard.seq_len=32"])
    assert summary["stages"] == {"tokenizer": "cached", "shard": "ran"}
    # the terminal in the graph's order: the cache hit's line before its downstream stage starts
    lines = [line.split()[:2] for line in terminal.getvalue().splitlines() if line.startswith(("tokenizer", "shard"))]
    assert lines == [["tokenizer", "cached"], ["shard", "started"], ["shard", "ran"]]
    assert json.loads((run_dir / "shard" / "manifest.json").read_text())["config"]["shard"]["seq_len"] == 32


def test_force_reruns_a_cached_stage(run_dir, base_overrides):
    summary = _run(run_dir, [*base_overrides, "shard.seq_len=32"], force=["tokenizer"])
    # same inputs and config give the same tokenizer bytes, so shard stays cached
    assert summary["stages"] == {"tokenizer": "ran", "shard": "cached"}


def test_killed_stage_reruns_alone(run_dir, base_overrides, tmp_path):
    overrides = [*base_overrides, "shard.seq_len=16"]
    env = {**os.environ, "LLMPIPE_FAULT": "shard:before_manifest"}  # the suite's Prefect home: its database is made
    args = [sys.executable, "-m", "llmpipe.cli", "run", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
            "--until", "shard"] + [arg for o in overrides for arg in ("--set", o)]
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:  # a file, not a pipe: the orphaned API server would hold a pipe open
        killed = subprocess.Popen(args, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        killed.wait(timeout=600)
    if group_alive(killed.pid):
        os.killpg(killed.pid, signal.SIGKILL)  # the embedded API server it left behind
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert list((run_dir / "shard").glob("*.arrow")), "the stage had written shards when it was killed"
    assert not (run_dir / "shard" / "manifest.json").exists()

    summary = _run(run_dir, overrides)
    assert summary["stages"] == {"tokenizer": "cached", "shard": "ran"}
    manifest = json.loads((run_dir / "shard" / "manifest.json").read_text())
    assert manifest["config"]["shard"]["seq_len"] == 16


def test_a_crawl_that_keeps_no_page_fails_once_with_its_reason(tmp_path, monkeypatch):
    """The crawl task retries what the network may not repeat, not a user's error."""
    import socket

    from flows.pipeline import pipeline
    from llmpipe import console, stages

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        seed = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    terminal = io.StringIO()
    monkeypatch.setitem(console._terminal, "stdout", terminal)
    with pytest.raises(stages.StagesFailed, match="crawl failed"):
        pipeline(config_path="configs/tiny.yaml", overrides=[f"crawl.seeds=[{seed}]", "crawl.retries=0"],
                 run_dir=str(tmp_path / "t"), until="crawl")
    failed = [line for line in terminal.getvalue().splitlines() if line.startswith("crawl      failed")]
    assert len(failed) == 1 and f"the crawl kept no page from {seed} (skipped, by reason: " in failed[0]


def test_config_error_in_flow_names_field(run_dir):
    with pytest.raises(configlib.ConfigError, match="shard.seq_len"):
        _run(run_dir, ["shard.seq_len=1"])
