"""Two runs at once, with real processes: a run directory is one run's at a time (a lock that a
killed run does not leave held); runs on different directories share one MLflow SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llmpipe.locks import RunDirBusy, run_lock
from llmpipe.tracking import EXPERIMENT, TEMPLATES_ENV

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time\nfrom llmpipe.locks import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"


def _tokenizer(run_dir: Path, corpus_dir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", "tokenizer", "--config", "configs/tiny.yaml",
                           "--run-dir", str(run_dir), "--set", f"tokenizer.input={corpus_dir}",
                           "--set", "tokenizer.vocab_size=300"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_run_on_a_busy_directory_stops_and_a_killed_run_leaves_it_free(tmp_path, corpus_dir):
    from flows.pipeline import pipeline

    run_dir = tmp_path / "runs" / "t"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        busy = _tokenizer(run_dir, corpus_dir, dict(os.environ))
        assert busy.returncode == 2
        assert busy.stderr.strip().splitlines() == [
            f"llmpipe tokenizer: {run_dir} is in use by another llmpipe run (pid {holder.pid} on {os.uname().nodename}); "
            "wait for it to end, or give this one another directory (--run-dir or run.run_dir)"]
        with pytest.raises(RunDirBusy):  # the flow, as a scheduled run starts it
            pipeline(config_path="configs/tiny.yaml", overrides=[f"tokenizer.input={corpus_dir}"],
                     run_dir=str(run_dir), until="tokenizer")
        assert not (run_dir / "tokenizer").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(run_dir):  # the killed holder left the directory free
        assert (run_dir / ".lock").is_file()


@pytest.mark.parametrize("templates", ["none", "new"])  # MLflow's migrations, or a copy of a store it migrated
def test_two_runs_on_other_directories_share_a_fresh_mlflow_store(tmp_path, corpus_dir, templates):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop(TEMPLATES_ENV, None)  # the suite's own (conftest), already made
    if templates == "new":
        env[TEMPLATES_ENV] = str(tmp_path / "templates")  # the two runs race to make it
    runs = [subprocess.Popen([sys.executable, "-m", "llmpipe.cli", "tokenizer", "--config", "configs/tiny.yaml",
                              "--run-dir", str(tmp_path / name), "--set", f"tokenizer.input={corpus_dir}",
                              "--set", "tokenizer.vocab_size=300"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    recorded = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["llmpipe.run"] for r in recorded) == ["tiny", "tiny"]
    assert {r.info.status for r in recorded} == {"FINISHED"}
    assert len(list((tmp_path / "templates").glob("mlflow-*.db"))) == (templates == "new")
