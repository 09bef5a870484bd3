"""Resources: a stage that runs out of disk space on a real (small) filesystem."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from llmpipe import config as configlib
from llmpipe import stages
from llmpipe.paths import RunDir


@contextlib.contextmanager
def small_filesystem(where: Path, size: str):
    """A tmpfs of `size` mounted at `where`, given back at the end; skips where none can be mounted."""
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root here (the test makes a real full disk, not a mock)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_stage_out_of_disk_space_stops_in_one_line_and_leaves_the_finished_stages_intact(
        tmp_path, corpus_dir, capsys, monkeypatch):
    from llmpipe.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store is elsewhere
    with small_filesystem(tmp_path / "small", "384k") as resize:
        run_dir = tmp_path / "small" / "runs" / "t"
        config_path = tmp_path / "t.yaml"
        config_path.write_text(configlib.to_yaml({
            "run": {"name": "t"}, "tokenizer": {"vocab_size": 300, "input": str(corpus_dir)},
            "shard": {"input": str(corpus_dir), "seq_len": 64, "tokens_per_shard": 16384}}))
        config = configlib.load(config_path, run_dir=run_dir)
        stages.execute("tokenizer", config)
        tokenizer_files = {p: p.read_bytes() for p in RunDir(run_dir).stage("tokenizer").rglob("*") if p.is_file()}
        capsys.readouterr()

        assert main(["shard", "--config", str(config_path), "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("llmpipe shard: shard ran out of disk space (No space left on device) with ")
        assert "the stages that finished are intact and stay cached; free space and rerun" in err
        shard_dir = RunDir(run_dir).stage("shard")
        assert not (shard_dir / "manifest.json").exists()  # it reruns
        assert not [p for p in shard_dir.rglob("*") if ".tmp-" in p.name]  # no half-written file left
        assert {p: p.read_bytes() for p in RunDir(run_dir).stage("tokenizer").rglob("*") if p.is_file()} == tokenizer_files
        stages.verify_outputs(RunDir(run_dir), "tokenizer")

        resize("16m")  # space freed: the same command finishes the stage
        assert main(["shard", "--config", str(config_path), "--run-dir", str(run_dir)]) == 0
        stages.verify_outputs(RunDir(run_dir), "shard")
