"""PPO speed on the tiny preset: batched rollouts against one prompt at a time, and a PPO step
split into generation, scoring and training.

    python benchmarks/ppo.py                         # tiny preset, the instruct stage's prompts
    python benchmarks/ppo.py --steps 32 --new-tokens 64

  * Rollouts: `--prompts` prompts sampled with the KV cache (`sample_responses`, PPO's own
    rollout code: per-row generators, left padding), `--new-tokens` each, at
    `generation_batch_size` 16 and 1: tokens per second, fastest of `--repeats`.
  * A PPO run (`run_ppo`, the stage's code) of `--steps` optimizer steps from random-init
    policy and reward model (speed does not depend on the weights; a random policy rarely
    stops early, so every response is about `--new-tokens` long): seconds per optimizer step
    in generation, scoring (policy, reference, critic and reward forwards) and training.

The tokenizer is trained here on the instruction data (the pipeline's comes from the crawl;
only the lengths it gives matter). Peak memory is this process's RSS. Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from post_training import default_data  # noqa: E402

from llmpipe.alignment.data import RowCounts, load_prompts  # noqa: E402
from llmpipe.alignment.ppo import run_ppo, sample_responses  # noqa: E402
from llmpipe.config import load  # noqa: E402
from llmpipe.data.loader import derive_seed  # noqa: E402
from llmpipe.model.model import Transformer  # noqa: E402
from llmpipe.model.release import save_release  # noqa: E402
from llmpipe.training.trainer import peak_memory_mb  # noqa: E402


def rollout_tokens_per_s(model, prompt_ids, cfg, stop_id, repeats: int) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    seeds = [derive_seed(0, i) for i in range(len(prompt_ids))]
    for _ in range(repeats):
        t0 = time.perf_counter()
        responses = sample_responses(model, prompt_ids, seeds, cfg, stop_id)
        best = min(best, time.perf_counter() - t0)
        tokens = sum(len(r) for r in responses)
    return tokens / best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in the rollout comparison")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of the PPO run")
    parser.add_argument("--examples", type=int, default=200, help="instruct doc and task examples each")
    args = parser.parse_args()
    config = load(args.config, [f"instruct.doc_examples={args.examples}", f"instruct.task_examples={args.examples}"])
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, encoder = default_data(work, config)
        prompts = load_prompts([data / "prompts" / "train.jsonl"], RowCounts("prompts"))
        prompt_ids = [encoder.prompt(p.prompt) for p in prompts[:args.prompts]]
        torch.manual_seed(config.run.seed)
        policy, reward_model = Transformer(config.model), Transformer(config.model, head="score")
        rates = {}
        for batch in (16, 1):
            cfg = config.ppo.model_copy(update={"generation_batch_size": batch, "max_new_tokens": args.new_tokens})
            rates[batch] = rollout_tokens_per_s(policy, prompt_ids, cfg, encoder.end, args.repeats)

        save_release(policy, work / "sft")
        save_release(reward_model, work / "reward")
        (work / "tokenizer").mkdir()
        encoder.tokenizer.save(str(work / "tokenizer" / "tokenizer.json"))
        cfg = config.ppo.model_copy(update={"max_steps": args.steps, "max_new_tokens": args.new_tokens,
                                            "checkpoint_every": 0, "eval_prompts": 0})
        result = run_ppo(config.model, cfg, sft_dir=work / "sft", reward_dir=work / "reward",
                         tokenizer_dir=work / "tokenizer", prompts=[data / "prompts" / "train.jsonl"],
                         heldout=[data / "prompts" / "heldout.jsonl"], out_dir=work / "ppo", seed=config.run.seed)

    print(f"\nPPO on {Path(args.config).name}'s model, {torch.get_num_threads()} threads\n")
    print(f"{'rollouts':<24} {'tokens':>7} {'tok/s':>9} {'ratio':>7}")
    for batch in (16, 1):
        rate, tokens = rates[batch]
        print(f"{'batch ' + str(batch):<24} {tokens:>7} {rate:>9,.0f} {rate / rates[1][0]:>6.2f}x")
    timing, steps = result["timing"], result["steps"]
    training = timing["train_time_s"] - timing["generation_s"] - timing["scoring_s"]
    print(f"\nPPO step ({steps} steps, {result['rollouts']} rollouts of {cfg.rollout_prompts} prompts, "
          f"{cfg.epochs} epochs)")
    print(f"{'part':<24} {'s/step':>7} {'share':>7}")
    for part, seconds in (("generation", timing["generation_s"]), ("scoring", timing["scoring_s"]),
                          ("training", training), ("total", timing["train_time_s"])):
        print(f"{part:<24} {seconds / steps:>7.3f} {seconds / timing['train_time_s']:>6.1%}")
    print(f"peak memory: {peak_memory_mb(torch.device('cpu')):,.0f} MB")


if __name__ == "__main__":
    main()
