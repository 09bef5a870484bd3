"""The launch boundary: training stages on torchrun workers, supervised, tracked, failing in one line.

The multi-process tests run real torchrun jobs of 2 gloo workers on the tiny test model; each
costs ~10 s before its first step (every worker imports torch).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from model_fixtures import MODEL, PRETRAIN, VOCAB, make_run_dir

from llmpipe import faults
from llmpipe.cli import build_parser, load_config
from llmpipe.distributed.launch import LaunchFiles, describe_failure
from llmpipe.paths import RunDir
from llmpipe.supervise import supervised
from llmpipe.tracking import EXPERIMENT, FileTracker, MlflowTracker, Replay, init_store, tracking_uri

# --- fault injection -------------------------------------------------------------------------


def test_fault_specs_name_stage_point_rank_and_action():
    assert faults.parse("pretrain:step_3@rank1:raise,shard:before_manifest") == [
        faults.Fault("pretrain", "step_3", 1, "raise"), faults.Fault("shard", "before_manifest", None, "kill")]
    with pytest.raises(ValueError, match="stage:point"):
        faults.parse("pretrain@rank1")


def test_raise_fault_fires_only_on_its_rank(monkeypatch):
    monkeypatch.setenv("LLMPIPE_FAULT", "pretrain:step_3@rank1:raise")
    monkeypatch.setenv("RANK", "0")
    faults.fault_point("pretrain", "step_3")
    monkeypatch.setenv("RANK", "1")
    faults.fault_point("pretrain", "step_2")
    with pytest.raises(RuntimeError, match="^injected fault at step 3$"):
        faults.fault_point("pretrain", "step_3")


def test_kill_fault_is_a_sigkill():
    code = "from llmpipe.faults import fault_point; fault_point('shard', 'before_manifest'); print('survived')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "LLMPIPE_FAULT": "shard:before_manifest"})
    assert result.returncode == -signal.SIGKILL and "survived" not in result.stdout


# --- supervision, tracking, failure messages -------------------------------------------------


def test_supervised_group_is_stopped_when_the_block_fails():
    with pytest.raises(KeyboardInterrupt):
        with supervised(["sh", "-c", "sleep 60 & sleep 60"]) as proc:
            time.sleep(0.3)  # let the shell start its background child
            raise KeyboardInterrupt
    assert proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 10  # the grandchild got the signal with the group; it may take a moment to exit
    while _processes_matching("sleep 60", pgid=proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_matching("sleep 60", pgid=proc.pid) == []  # the grandchild went with the group


@pytest.fixture(scope="module")
def tracking_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a stage process whose MLflow store exists (made once: ~7 s on 2 cores)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    init_store(uri, root)
    return {**os.environ, "MLFLOW_TRACKING_URI": uri}


def test_a_workers_tracking_calls_reach_the_run_while_it_runs_and_leave_its_status_to_the_owner(tracking_env, tmp_path):
    uri = tracking_env["MLFLOW_TRACKING_URI"]
    owner = MlflowTracker(uri, init_store(uri), run_name="pretrain")
    worker = FileTracker(tmp_path / "tracking.jsonl", owner.uri, owner.run_id)
    client = MlflowClient(uri)
    with Replay(tmp_path / "tracking.jsonl", owner, every_s=0.05) as replay:
        worker.log_params({"pretrain.lr": 0.001})
        worker.log_metrics({"train/loss": 2.5}, step=1)
        worker.set_tags({"llmpipe.note": "live"})
        deadline = time.monotonic() + 10
        while "llmpipe.note" not in client.get_run(owner.run_id).data.tags and time.monotonic() < deadline:
            time.sleep(0.05)  # replayed while the worker runs, not only at its end
        assert client.get_run(owner.run_id).data.tags["llmpipe.note"] == "live"
        with open(tmp_path / "tracking.jsonl", "a") as f:
            f.write('["log_metrics", {"train/loss": 9.0}')  # a line the worker is still writing
        replay.poll()
        with open(tmp_path / "tracking.jsonl", "a") as f:
            f.write(", 3]\n")
        worker.log_metrics({"train/loss": 2.0}, step=2)
        worker.close()
    owner.flush()
    assert client.get_run(owner.run_id).info.status == "RUNNING"
    assert client.get_run(owner.run_id).data.params["pretrain.lr"] == "0.001"
    assert sorted((m.step, m.value) for m in client.get_metric_history(owner.run_id, "train/loss")) == [(1, 2.5), (2, 2.0), (3, 9.0)]
    owner.close()
    assert client.get_run(owner.run_id).info.status == "FINISHED"


TORCHRUN_SUMMARY = """\
Failures:
[1]:
  time      : 2026-11-21_23:00:28
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7317)  (SIGTERM)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-21_23:00:28
  host      : localhost
  rank      : {rank} (local_rank: {rank})
  exitcode  : {code} (pid: 7318)  ({name})
  error_file: <N/A>
"""


def test_failure_line_names_a_killed_worker_else_the_first_recorded_error(tmp_path):
    files = LaunchFiles.of(tmp_path)
    files.root.mkdir()
    killed = TORCHRUN_SUMMARY.format(rank=1, code=-9, name="SIGKILL").splitlines()
    crashed = TORCHRUN_SUMMARY.format(rank=1, code=1, name="").splitlines()
    assert describe_failure(files, 1, killed) == "worker rank 1 failed: killed by SIGKILL"
    assert describe_failure(files, 1, ["", "ImportError: no module", ""]) == \
        "torchrun failed (exit code 1): ImportError: no module"
    # the culprit records first; the peer it left in a collective records after it
    files.error(0).write_text(json.dumps({"rank": 0, "error": "DistBackendError: connection closed", "time": 2.5}))
    assert describe_failure(files, 1, killed) == "worker rank 1 failed: killed by SIGKILL"  # a signal outranks it
    files.error(1).write_text(json.dumps({"rank": 1, "error": "RuntimeError: injected fault", "time": 2.4}))
    assert describe_failure(files, 1, crashed) == "worker rank 1 failed: RuntimeError: injected fault"


def test_nproc_option_only_on_training_stages():
    args = build_parser().parse_args(["pretrain", "--config", "configs/tiny.yaml", "--nproc", "2"])
    assert load_config(args).pretrain.nproc == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["shard", "--config", "configs/tiny.yaml", "--nproc", "2"])


# --- real torchrun jobs ----------------------------------------------------------------------


def _processes_matching(text: str, pgid: int | None = None) -> list[int]:
    """Live processes whose command line contains `text` (and, if given, in process group `pgid`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if text in cmdline and state[0] != "Z" and (pgid is None or int(state[2]) == pgid):
            found.append(int(entry.name))
    return found


def _wait_until_gone(text: str, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _processes_matching(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _config_file(tmp_path: Path, **pretrain) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"run": {"seed": 7}, "tokenizer": {"vocab_size": VOCAB}, "model": MODEL,
                                    "pretrain": {**PRETRAIN, **pretrain}}))
    return path


def _llmpipe_pretrain(config: Path, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "llmpipe.training.pretrain", "--config", str(config), "--run-dir", str(run_dir), *args]


@pytest.mark.slow
@pytest.mark.distributed
def test_crashed_worker_fails_the_stage_in_one_line_leaves_nothing_and_resumes(tmp_path, tracking_env):
    run_dir = make_run_dir(tmp_path / "crash-run")
    config = _config_file(tmp_path, max_steps=8, checkpoint_every=2)
    env = tracking_env
    crashed = subprocess.run(_llmpipe_pretrain(config, run_dir, "--nproc", "2"), capture_output=True, text=True,
                             env={**env, "LLMPIPE_FAULT": "pretrain:step_5@rank1:raise"}, timeout=300)
    assert crashed.returncode == 2, crashed.stderr[-3000:]
    assert crashed.stderr.strip().splitlines()[-1] == \
        "llmpipe pretrain: pretrain: worker rank 1 failed: RuntimeError: injected fault at step 5"
    assert "injected fault" in RunDir(run_dir).stage_log("pretrain").read_text()  # the worker's traceback, streamed
    assert _wait_until_gone(str(run_dir)) == []
    assert not (run_dir / "pretrain" / "manifest.json").exists()

    resumed = subprocess.run(_llmpipe_pretrain(config, run_dir, "--nproc", "2"), capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == 4  # the last checkpoint before step 5
    assert manifest["counts"]["steps"] == 8
    assert not any(name.startswith(".") for name in manifest["files"])


@pytest.mark.slow
@pytest.mark.distributed
def test_killing_the_stage_process_kills_its_workers(tmp_path, tracking_env):
    run_dir = make_run_dir(tmp_path / "kill-run")
    config = _config_file(tmp_path, max_steps=100_000, checkpoint_every=0, eval_every=0, log_every=1)
    parent = subprocess.Popen(_llmpipe_pretrain(config, run_dir, "--nproc", "2", "--verbose"), env=tracking_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in parent.stdout:  # wait until the workers are training
        if line.startswith("step"):
            break
    assert len(_processes_matching(str(run_dir))) >= 3  # torchrun and two workers
    parent.kill()
    parent.wait()
    assert _wait_until_gone(str(run_dir)) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_flow_trains_fsdp_on_two_workers_logs_one_run_and_is_cached_next_time(tmp_path, corpus_dir):
    """The acceptance run, small: `llmpipe run --set pretrain.parallel.strategy=fsdp --set pretrain.nproc=2`."""
    from flows.pipeline import pipeline

    overrides = [f"tokenizer.input={corpus_dir}", f"shard.input={corpus_dir}", "tokenizer.vocab_size=600",
                 "shard.seq_len=64", "shard.tokens_per_shard=4096", "run.name=launchflow",
                 *(f"model.{key}={value}" for key, value in {**MODEL, "vocab_size": 640, "seq_len": 64}.items()),
                 # tiny's micro_batch_size (16) exceeds a rank's share of 256 tokens: each runs its 2 sequences
                 "pretrain.max_steps=6", "pretrain.batch_tokens=256",
                 "pretrain.eval_every=0", "pretrain.checkpoint_every=0", "pretrain.log_every=1",
                 "pretrain.peak_flops=1e11", "pretrain.parallel.strategy=fsdp", "pretrain.nproc=2"]
    run_dir = tmp_path / "runs" / "launchflow"

    def run():
        return pipeline(config_path="configs/tiny.yaml", overrides=overrides, run_dir=str(run_dir), until=["pretrain"])

    first = run()
    assert first["stages"] == {"tokenizer": "ran", "shard": "ran", "pretrain": "ran"}
    manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
    assert manifest["counts"]["world_size"] == 2 and manifest["counts"]["steps"] == 6
    assert "model.safetensors" in manifest["files"]
    client = MlflowClient(tracking_uri(run_dir.parent))
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert len(client.search_runs([experiment])) == 4  # the flow's run and one per stage: no worker made its own
    (pretrain,) = client.search_runs([experiment], "tags.`llmpipe.stage` = 'pretrain'")
    assert pretrain.info.status == "FINISHED" and pretrain.data.tags["mlflow.parentRunId"] == first["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert pretrain.data.metrics["steps"] == 6  # the parent logged rank 0's result as the stage's counts
    assert "model.safetensors" in [a.path for a in client.list_artifacts(pretrain.info.run_id)]  # logged by rank 0

    again = run()
    assert again["stages"] == {"tokenizer": "cached", "shard": "cached", "pretrain": "cached"}


# --- several nodes: Slurm's sbatch, or the command each node runs -------------------------------

STANDINS = Path(__file__).with_name("slurm_standins")  # sbatch, srun and scontrol for a job whose nodes are all here


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(run_dir: Path) -> tuple[str, dict]:
    manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
    return manifest["files"]["model.safetensors"]["sha256"], manifest["counts"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_by_sbatch_or_by_the_printed_command_train_what_two_local_workers_train(tmp_path, tracking_env):
    """Two `torchrun --nnodes 2` agents meeting at a c10d rendezvous on 127.0.0.1, started by the real
    scripts/slurm/pretrain.sbatch under stand-ins of sbatch/srun/scontrol, and by the command the stage
    prints for `launcher: torchrun`: the same weights, bit for bit, as 2 workers of `torchrun --standalone`."""
    config = _config_file(tmp_path, max_steps=4, checkpoint_every=2, eval_every=0)
    env = {**tracking_env, "OMP_NUM_THREADS": "1"}
    local = make_run_dir(tmp_path / "local")
    done = subprocess.run(_llmpipe_pretrain(config, local, "--nproc", "2"), capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    weights, counts = _weights(local)
    assert counts["world_size"] == 2

    slurm = make_run_dir(tmp_path / "slurm")
    nodes = ["--set", "pretrain.nnodes=2"]
    done = subprocess.run(_llmpipe_pretrain(config, slurm, *nodes, "--set", "pretrain.launcher=slurm"),
                          capture_output=True, text=True, timeout=300,
                          env={**env, "PATH": f"{STANDINS}{os.pathsep}{env['PATH']}", "RDZV_PORT": str(_free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(slurm) == (weights, counts)

    printed = make_run_dir(tmp_path / "printed")
    endpoint = f"127.0.0.1:{_free_port()}"
    stage = subprocess.Popen(_llmpipe_pretrain(config, printed, *nodes, "--set", f"pretrain.rdzv_endpoint={endpoint}"),
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in stage.stdout:
        lines.append(line)
        if "torch.distributed.run" in line:
            break
    command = shlex.split(lines[-1])
    assert "waiting for 2 nodes" in lines[-2] and f"--rdzv-endpoint={endpoint}" in command, lines
    agents = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [agent.wait(timeout=300) for agent in agents] == [0, 0]
    assert stage.wait(timeout=60) == 0, stage.stdout.read()[-3000:]
    assert _weights(printed) == (weights, counts)
