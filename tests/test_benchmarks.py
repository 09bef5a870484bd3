"""The benchmark scripts still run end to end, at their smallest sizes (their numbers vary with the
machine and are not checked here: each prints its table for a person to read)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# script -> (arguments, a row of its table: a pattern that a measured line matches)
CASES = {
    "shard_throughput.py": (["--work-dir", "{tmp}", "--corpus-mb", "1", "--vocab-size", "500", "--repeat", "1"],
                            r"^shard stage\s+\d"),
    "data_throughput.py": (["--site-pages", "20", "--pydoc-pages", "20", "--workers", "1"], r"^minhash filter\s+1\s+\d"),
    "pretrain_throughput.py": (["--models", "tiny", "--modes", "eager", "--steps", "1", "--warmup", "1",
                                "--paired-steps", "2", "--batch", "2"], r"llama/gpt2 eager\s+\d+\.\d+x"),
    "scaling.py": (["--strategies", "ddp", "--nproc", "1", "--steps", "2"], r"^ddp\s+1\s+\d+\s+[\d,]+\s"),
}


@pytest.mark.parametrize("script", CASES)
def test_benchmark_prints_its_table(script, tmp_path):
    args, row = CASES[script]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *(a.format(tmp=tmp_path) for a in args)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(row, proc.stdout, re.MULTILINE), proc.stdout[-2000:]
