"""Training throughput per parallel strategy on 1 and 2 processes, through the stage's launch path.

    python benchmarks/scaling.py                                  # every strategy, 1 and 2 processes
    python benchmarks/scaling.py --strategies ddp,fsdp --nproc 1,2,4 --steps 30

Each case is the pretrain stage's function run by `llmpipe.distributed.launch.run_workers`, as
`pretrain.nproc > 1` runs it: torchrun workers, a fresh output folder, the tiny preset's model
(configs/tiny.yaml) in fp32 on shards made here (the tokenizer and shard stages on pydoc text).
tokens/s is the trainer's own count (all ranks' tokens over the time inside training steps, so
start-up, evaluation and the final save are left out: they are the overhead column); peak memory
is the largest resident set of any rank.
The launch gives each of N workers cpu_count / N threads (unless OMP_NUM_THREADS is set), so 1
process uses every core too; on a loaded machine threads that wait for each other suffer most:
compare with `OMP_NUM_THREADS=1`.
Strategies that cannot run at a process count (tp and pp need it to equal their degree, fsdp_tp
needs >= 4) are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import pydoc
import sys
import tempfile
import time
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmpipe import config as configlib  # noqa: E402
from llmpipe import stages  # noqa: E402
from llmpipe.distributed.launch import LaunchFiles, run_workers, worker_env  # noqa: E402
from llmpipe.errors import UserError  # noqa: E402
from llmpipe.paths import RunDir  # noqa: E402

STRATEGIES = list(typing.get_args(configlib.ParallelConfig.model_fields["strategy"].annotation))
CORPUS_MODULES = ["argparse", "collections", "dataclasses", "functools", "itertools", "json", "pathlib",
                  "shutil", "statistics", "string", "textwrap", "typing", "unittest", "email", "logging"]


def layout(strategy: str, nproc: int, batch_sequences: int) -> list[str]:
    """The overrides that put the tiny model on `nproc` processes with `strategy`, the global batch
    (`batch_sequences`) split between the data-parallel ranks, or into one micro-batch per stage
    for the pipeline (its schedule needs at least that many)."""
    splits = {"tp": 1, "fsdp_tp": max(1, nproc // 2)}.get(strategy, nproc)
    overrides = [f"pretrain.parallel.strategy={strategy}", f"pretrain.nproc={nproc}",
                 f"pretrain.micro_batch_size={max(1, batch_sequences // splits)}"]
    if strategy in ("tp", "pp", "fsdp_tp"):
        overrides.append("model.tie_embeddings=false")  # sharded or placed apart from the embedding
    if strategy == "tp":
        overrides.append(f"pretrain.parallel.tp={nproc}")
    if strategy == "pp":
        overrides.append(f"pretrain.parallel.pp={nproc}")
    if strategy == "fsdp_tp":
        overrides.append("pretrain.parallel.tp=2")
    return overrides


def prepare_data(work: Path) -> list[str]:
    """Tokenizer and shards of pydoc text in work/run (made once); the overrides that point at them."""
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name in CORPUS_MODULES:
        (corpus / f"{name}.txt").write_text(pydoc.render_doc(__import__(name), renderer=pydoc.plaintext))
    overrides = [f"tokenizer.input={corpus}", f"shard.input={corpus}", "shard.tokens_per_shard=65536"]
    config = configlib.load(ROOT / "configs/tiny.yaml", overrides, work / "run")
    for stage in ("tokenizer", "shard"):
        stages.execute(stage, config)
    return overrides


def run_case(work: Path, data: list[str], strategy: str, nproc: int, steps: int, batch_sequences: int) -> dict:
    overrides = [*data, f"pretrain.max_steps={steps}", "pretrain.eval_every=0", "pretrain.checkpoint_every=0",
                 f"pretrain.log_every={steps}", "pretrain.dtype=float32", "pretrain.peak_flops=1e11",
                 *layout(strategy, nproc, batch_sequences)]
    config = configlib.load(ROOT / "configs/tiny.yaml", overrides, work / "run")
    out_dir = work / "cases" / f"{strategy}-{nproc}"
    ctx = stages.StageContext(name="pretrain", run_dir=RunDir(config.run_dir), out_dir=out_dir, seed=config.run.seed,
                              inputs=stages.get_stage("pretrain").input_paths(config))
    log = out_dir.with_suffix(".log")
    out_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        counts = run_workers(ctx, config, nproc, on_line=lambda line: print(line, file=out))
    wall = time.perf_counter() - t0
    files = LaunchFiles.of(out_dir)
    peak = max(json.loads(files.result(rank).read_text())["timing"]["peak_mem_mb"] for rank in range(nproc))
    return {"tokens_per_s": counts["timing"]["tokens_per_s"], "peak_mem_mb": peak,
            "startup_s": wall - counts["timing"]["train_time_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, from " + ", ".join(STRATEGIES))
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=20, help="training steps per case")
    args = parser.parse_args(argv)
    strategies, counts = args.strategies.split(","), [int(n) for n in args.nproc.split(",")]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")

    with tempfile.TemporaryDirectory(prefix="llmpipe-scaling-") as tmp:
        work = Path(tmp)
        data = prepare_data(work)
        preset = configlib.load(ROOT / "configs/tiny.yaml", data, work / "run")
        batch_sequences = preset.pretrain.batch_tokens // preset.model.seq_len
        print(f"{'strategy':<9} {'nproc':>5} {'threads':>7} {'tokens/s':>10} {'peak MB/rank':>12} {'vs 1 proc':>9} "
              f"{'overhead s':>10}")
        failed = 0
        for strategy in strategies:
            single = None
            for nproc in counts:
                try:
                    configlib.load(ROOT / "configs/tiny.yaml", [*data, *layout(strategy, nproc, batch_sequences)],
                                   work / "run")
                except UserError as err:
                    print(f"{strategy:<9} {nproc:>5} skipped: {err}", flush=True)
                    continue
                try:
                    row = run_case(work, data, strategy, nproc, args.steps, batch_sequences)
                except UserError as err:
                    print(f"{strategy:<9} {nproc:>5} failed: {err}", flush=True)
                    failed += 1
                    continue
                single = row["tokens_per_s"] if nproc == 1 else single
                ratio = f"{row['tokens_per_s'] / single:.2f}x" if single else "-"
                threads = worker_env(nproc)["OMP_NUM_THREADS"]
                print(f"{strategy:<9} {nproc:>5} {threads:>7} {row['tokens_per_s']:>10,.0f} {row['peak_mem_mb']:>12,.0f} "
                      f"{ratio:>9} {row['startup_s']:>10.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
