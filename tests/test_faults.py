"""Kill anywhere, lose nothing: a stage process SIGKILLed at a chosen point (`LLMPIPE_FAULT`),
then the same stage again, ends with the bytes of a run that was never killed.

The kill points of the training stages run their workers (test_pretrain, test_post_training,
test_launch); the crawl's, a flow's and a whole process's are in test_crawl, test_flow and
test_pretrain. Here: the data stages, whose kill takes down the stage process itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_prepare import _site_pages, write_warc

from llmpipe import config as configlib
from llmpipe import io, stages
from llmpipe.paths import RunDir

pytestmark = pytest.mark.slow

# one stage in a fresh process, without the CLI's MLflow run: what a worker or a scheduler starts
STAGE = "import sys; from llmpipe import config, stages; stages.execute(sys.argv[1], config.load(sys.argv[2], run_dir=sys.argv[3]))"


def _killed_then_rerun(stage: str, config_path: Path, run_dir: Path, fault: str) -> None:
    command = [sys.executable, "-c", STAGE, stage, str(config_path), str(run_dir)]
    killed = subprocess.run(command, env={**os.environ, "LLMPIPE_FAULT": fault}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not RunDir(run_dir).manifest(stage).exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]


def _outputs(folder: Path) -> dict[str, str]:
    """Every file a stage wrote, bookkeeping included but for datatrove's logs and Prefect's results."""
    return {str(p.relative_to(folder)): io.sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not {".datatrove", ".prefect", ".timing.json"} & set(p.relative_to(folder).parts)}


@pytest.fixture(scope="module")
def data_config(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("faults")
    warc = root / "site.warc.gz"
    write_warc(warc, _site_pages())
    path = root / "data.yaml"
    path.write_text(configlib.to_yaml({"run": {"name": "f"}, "crawl": {"warc_inputs": [str(warc)]},
                                       "prepare": {"tasks": 2, "workers": 2}, "tokenizer": {"vocab_size": 300, "input": str(corpus_dir)},
                                       "shard": {"input": str(corpus_dir), "seq_len": 64, "tokens_per_shard": 16384}}))
    uninterrupted = root / "uninterrupted"
    config = configlib.load(path, run_dir=uninterrupted)
    for name in ("crawl", "prepare", "tokenizer", "shard"):
        stages.execute(name, config)
    return path, uninterrupted


def test_prepare_killed_between_its_datatrove_jobs_resumes_to_the_same_documents(data_config, tmp_path):
    path, uninterrupted = data_config
    run_dir = tmp_path / "killed"
    stages.execute("crawl", configlib.load(path, run_dir=run_dir))
    _killed_then_rerun("prepare", path, run_dir, "prepare:after_exact_filter")  # exact dedup done, MinHash not
    assert _outputs(run_dir / "prepare") == _outputs(uninterrupted / "prepare")


def test_shard_killed_while_writing_a_shard_leaves_no_file_and_reruns_to_the_same_shards(data_config, tmp_path):
    path, uninterrupted = data_config
    run_dir = tmp_path / "killed"
    config = configlib.load(path, run_dir=run_dir)
    for name in ("crawl", "prepare", "tokenizer"):
        stages.execute(name, config)
    command = [sys.executable, "-c", STAGE, "shard", str(path), str(run_dir)]
    killed = subprocess.run(command, env={**os.environ, "LLMPIPE_FAULT": "write:train_00001.arrow"}, capture_output=True, timeout=300)
    assert killed.returncode == -9
    shard_dir = run_dir / "shard"
    assert (shard_dir / "train_00000.arrow").is_file() and not (shard_dir / "train_00001.arrow").exists()
    assert [p.name for p in shard_dir.iterdir() if p.name.startswith(".train_00001")]  # whole, fsynced, never renamed
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    assert _outputs(shard_dir) == _outputs(uninterrupted / "shard")
    assert len([name for name in _outputs(shard_dir) if name.startswith("train_")]) >= 2
