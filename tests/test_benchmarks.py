"""The benchmark scripts still run end to end, at their smallest sizes (their numbers vary with the
machine and are not checked here: each prints its table for a person to read). What is checked:
the rows are there, and a training step runs SDPA's flash attention and AdamW's fused kernel."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# script -> (arguments, rows of its table: patterns that measured lines match)
CASES = {
    "shard_throughput.py": (["--work-dir", "{tmp}", "--corpus-mb", "1", "--vocab-size", "500", "--repeat", "1"],
                            [r"^shard stage\s+\d"]),
    "data_throughput.py": (["--site-pages", "20", "--pydoc-pages", "20", "--workers", "1"], [r"^minhash filter\s+1\s+\d"]),
    "pretrain_throughput.py": (["--models", "tiny", "--modes", "eager", "--steps", "1", "--warmup", "1",
                                "--paired-steps", "2", "--batch", "2"],
                               [r"^\s+tiny llama\s+eager .* flash/fused$",  # SDPA's flash kernel, fused AdamW
                                r"llama/gpt2 eager\s+\d+\.\d+x"]),
    "scaling.py": (["--strategies", "ddp", "--nproc", "1", "--steps", "2"], [r"^ddp\s+1\s+\d+\s+[\d,]+\s"]),
    "post_training.py": (["--steps", "1", "--warmup", "1", "--repeats", "1", "--examples", "60"],
                         [r"^sft packed\s+\d+\.\d+\s+[\d,]+", r"^dpo cached reference\s+\d+\.\d+"]),
    "ppo.py": (["--prompts", "2", "--new-tokens", "4", "--repeats", "1", "--steps", "2", "--examples", "40"],
               [r"^batch 16\s+\d+\s+[\d,]+\s+\d+\.\d+x", r"^generation\s+\d+\.\d+"]),
    "eval_multiple_choice.py": (["--items", "16", "--repeats", "1", "--batch-size", "8"],
                                [r"^llmpipe\s+\d+\.\d+\s+\d", r"acc and acc_norm equal on every item: True$"]),
    "data_memory.py": (["--work-dir", "{tmp}", "--sizes-mb", "0.5,1", "--vocab-size", "500", "--seq-len", "64",
                        "--tokens-per-shard", "65536"],
                       [r"^shard stage\s+1\s+[\d,]+\s", r"^loader: corpus x2 -> peak anonymous memory x\d"]),
    "chat_generation.py": (["--batches", "1,2", "--new-tokens", "8", "--warmup", "1", "--repeats", "1", "--rounds", "1"],
                           [r"^llmpipe\s+2\s+[\d,]+", r"^llmpipe/transformers batch\s+2:\s+\d+\.\d+x"]),
}


@pytest.mark.parametrize("script", CASES)
def test_benchmark_prints_its_table(script, tmp_path):
    args, rows = CASES[script]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *(a.format(tmp=tmp_path) for a in args)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for row in rows:
        assert re.search(row, proc.stdout, re.MULTILINE), (row, proc.stdout[-2000:])
