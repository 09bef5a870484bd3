"""Post-training throughput on the tiny preset and the default instruction data, side by side:

  * SFT, packed vs padded rows: useful (loss-bearing, assistant) tokens per second;
  * DPO with the cached reference log-probs vs a reference forward in every step: steps per second.

    python benchmarks/post_training.py                       # tiny preset, the instruct stage's data
    python benchmarks/post_training.py --steps 20 --repeats 3

Each case trains the tiny model (configs/tiny.yaml's `model`, random init: speed does not depend
on the weights) through the one trainer with the stage's own step function and loader, for
`--steps` optimizer steps after `--warmup` steps; the cases alternate, `--repeats` times, and
each keeps its median. The tokenizer is trained here on the instruction data itself (the
pipeline's comes from the crawl; only the lengths it gives matter here). Peak memory is this
process's RSS. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmpipe.alignment import dpo, instruct  # noqa: E402
from llmpipe.alignment.data import RowCounts, load_conversations, load_preferences  # noqa: E402
from llmpipe.alignment.render import ChatEncoder, encode_pairs  # noqa: E402
from llmpipe.alignment.sft import assistant_loss_step, encode_conversations, sft_rows, trained_tokens  # noqa: E402
from llmpipe.config import load  # noqa: E402
from llmpipe.context import StageContext  # noqa: E402
from llmpipe.data.loader import RowLoader  # noqa: E402
from llmpipe.paths import RunDir  # noqa: E402
from llmpipe.tokenizer.special import SPECIAL_TOKENS  # noqa: E402
from llmpipe.training.trainer import Trainer, TrainTask, build_model, peak_memory_mb  # noqa: E402


def default_data(work: Path, config) -> tuple[Path, ChatEncoder]:
    """The instruct stage's files in `work`, and a BPE trained on their text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = work / "instruct"
    out.mkdir(parents=True, exist_ok=True)
    instruct.instruct_stage(StageContext("instruct", RunDir(work), out, config.run.seed), config.instruct)
    texts = [line for path in sorted(out.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=config.tokenizer.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return out, ChatEncoder(tokenizer)


def timed_steps(trainer: Trainer, task: TrainTask, warmup: int, steps: int) -> float:
    """Seconds per optimizer step (median over `steps`, after `warmup`)."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainer._forward_backward(task)
        for optimizer in trainer.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sft_case(config, encoder, data: Path, packing: bool) -> tuple[Trainer, TrainTask, float]:
    """The trainer, task and useful tokens per step of SFT with or without packing."""
    cfg = config.sft.model_copy(update={"packing": packing})
    counts = RowCounts("sft.data")
    examples = encode_conversations(encoder, load_conversations([data / "sft" / "train.jsonl"], counts),
                                    config.model.seq_len, counts)
    trainer = Trainer(config.model, cfg, seed=config.run.seed, section="sft")
    items, collate = sft_rows(examples, packing, config.model.seq_len, config.run.seed)
    loader = RowLoader(items, trainer.micro_batch_size, collate, seed=config.run.seed)
    rows_per_step = trainer.micro_batch_size * trainer.accumulation
    useful_per_step = trained_tokens(examples) / len(items) * rows_per_step
    return trainer, TrainTask("sft", assistant_loss_step, loader), useful_per_step


def dpo_case(config, encoder, data: Path, cached: bool) -> tuple[Trainer, TrainTask]:
    counts = RowCounts("dpo.data")
    pairs = encode_pairs(encoder, load_preferences([data / "preferences" / "train.jsonl"], counts),
                         config.model.seq_len, counts)
    trainer = Trainer(config.model, config.dpo, seed=config.run.seed, section="dpo")
    reference = None
    if not cached:
        torch.manual_seed(config.run.seed)
        reference = build_model(config.model, trainer.device).eval()
    items = [(pair, 0.0, 0.0) for pair in pairs]  # cached values: any numbers cost the same
    loader = RowLoader(items, trainer.micro_batch_size, dpo.collate_pairs, seed=config.run.seed)
    return trainer, TrainTask("dpo", dpo.dpo_step_fn(config.dpo, reference), loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--examples", type=int, help="instruct doc and task examples each (default: the config's)")
    args = parser.parse_args()
    overrides = [f"instruct.doc_examples={args.examples}", f"instruct.task_examples={args.examples}"] if args.examples else []
    config = load(args.config, overrides)
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as work:
        data, encoder = default_data(Path(work), config)
        sft = {packing: sft_case(config, encoder, data, packing) for packing in (True, False)}
        dpos = {cached: dpo_case(config, encoder, data, cached) for cached in (True, False)}
        sft_times = {k: [] for k in sft}
        dpo_times = {k: [] for k in dpos}
        for _ in range(args.repeats):
            for packing, (trainer, task, _) in sft.items():
                sft_times[packing].append(timed_steps(trainer, task, args.warmup, args.steps))
            for cached, (trainer, task) in dpos.items():
                dpo_times[cached].append(timed_steps(trainer, task, args.warmup, args.steps))

    print(f"\npost-training throughput, {Path(args.config).name} model, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.repeats} repeats (median)")
    print(f"{'case':<28} {'s/step':>8} {'useful tok/s':>13} {'steps/s':>8} {'ratio':>7}")
    useful = {p: sft[p][2] / statistics.median(sft_times[p]) for p in sft}
    for packing, label in ((True, "sft packed"), (False, "sft padded")):
        print(f"{label:<28} {statistics.median(sft_times[packing]):>8.3f} {useful[packing]:>13,.0f} "
              f"{1 / statistics.median(sft_times[packing]):>8.2f} {useful[packing] / useful[False]:>6.2f}x")
    rate = {c: 1 / statistics.median(dpo_times[c]) for c in dpos}
    for cached, label in ((True, "dpo cached reference"), (False, "dpo reference forward")):
        print(f"{label:<28} {1 / rate[cached]:>8.3f} {'':>13} {rate[cached]:>8.2f} {rate[cached] / rate[False]:>6.2f}x")
    print(f"peak memory: {peak_memory_mb(torch.device('cpu')):,.0f} MB")


if __name__ == "__main__":
    main()
