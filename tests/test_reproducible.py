"""Same inputs, same bytes: a run repeated in another directory writes identical files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_prepare import _site_pages, write_warc

from llmpipe import config as configlib
from llmpipe import io, stages

pytestmark = pytest.mark.slow

STAGES = ("crawl", "prepare", "tokenizer", "shard", "pretrain")


def _config(tmp_path: Path, warc: Path) -> Path:
    path = tmp_path / "repro.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "repro", "seed": 3},
        "crawl": {"warc_inputs": [str(warc)]},
        "prepare": {"tasks": 2, "workers": 2},
        "tokenizer": {"vocab_size": 300},
        "shard": {"seq_len": 16, "tokens_per_shard": 1024, "val_fraction": 0.25},
        "model": {"vocab_size": 300, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 16},
        "pretrain": {"max_steps": 3, "batch_tokens": 64, "micro_batch_size": 4, "eval_every": 0, "eval_steps": 1,
                     "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1},
    }))
    return path


def _file_hashes(run_dir: Path) -> dict[str, str]:
    """Every file of the run but its logs and hidden bookkeeping (caches, locks, datatrove's state)."""
    return {str(p.relative_to(run_dir)): io.sha256_file(p) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] != "logs"
            and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)}


def test_a_run_repeated_elsewhere_writes_the_same_bytes(tmp_path):
    warc = tmp_path / "input" / "site.warc.gz"
    write_warc(warc, _site_pages())
    config_path = _config(tmp_path, warc)
    hashes = []
    for where in ("first/runs/repro", "elsewhere/deeper/repro"):  # another path, another wall clock
        config = configlib.load(config_path, run_dir=tmp_path / where)
        for name in STAGES:
            stages.execute(name, config)
        hashes.append(_file_hashes(tmp_path / where))
    first, second = hashes
    assert {f"{name}/manifest.json" for name in STAGES} | {"config.yaml", "pretrain/model.safetensors"} <= set(first)
    assert any(name.startswith("prepare/documents/") for name in first)
    assert {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)} == set()
