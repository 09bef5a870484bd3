"""GRPO with verifiable rewards (`ppo.advantage: grpo`, `ppo.reward: checker`) on a finished run:
does held-out task accuracy rise over SFT's?

    make demo                                        # a run with sft and reward: runs/tiny
    python benchmarks/grpo_checker.py                # runs/tiny, the `count` task
    python benchmarks/grpo_checker.py --tasks count add --steps 300

Prompts are fresh questions of the chosen tasks made by the instruct stage's generators and
split as that stage splits them (by a hash of the question under the run's seed), so no
held-out question is one SFT trained on. GRPO trains the run's SFT model (the `ppo` stage's
code, `run_ppo`, into a temporary folder) with the run's config and the overrides below. Prints
a table: for SFT and GRPO, greedy accuracy (the stage's `task_accuracy`) and sampled accuracy
(temperature 1, `--samples` per prompt) on the held-out prompts, GRPO's KL to SFT, and what
always giving the held-out set's most common answer scores (a policy that found that one
answer pays most often is not one that learned the task: compare with that row).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmpipe.alignment.checker import make_question  # noqa: E402
from llmpipe.alignment.data import RowCounts, load_prompts  # noqa: E402
from llmpipe.alignment.instruct import is_heldout  # noqa: E402
from llmpipe.alignment.ppo import checker_scores, run_ppo, sample_responses  # noqa: E402
from llmpipe.alignment.render import ChatEncoder  # noqa: E402
from llmpipe.config import load  # noqa: E402
from llmpipe.data.loader import derive_seed  # noqa: E402
from llmpipe.model.release import load_release  # noqa: E402
from llmpipe.paths import RunDir  # noqa: E402
from llmpipe.tokenizer.train import load_tokenizer  # noqa: E402


def write_prompts(folder: Path, tasks: list[str], n_train: int, n_heldout: int, seed: int, fraction: float,
                  max_operand: int, drop_answers: tuple[str, ...] = ()) -> tuple[Path, Path]:
    rng, seen = random.Random(seed + 1), set()
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for attempt in range(200 * (n_train + n_heldout)):
        q = make_question(tasks[attempt % len(tasks)], rng, max_operand)
        split = "heldout" if is_heldout(q.question, seed, fraction) else "train"
        if q.question in seen or q.answer in drop_answers or len(splits[split]) >= (n_train if split == "train" else n_heldout):
            continue
        seen.add(q.question)
        splits[split].append({"prompt": q.question, "task": q.task, "answer": q.answer})
        if len(splits["train"]) >= n_train and len(splits["heldout"]) >= n_heldout:
            break
    paths = []
    for split, rows in splits.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def sampled_accuracy(model, encoder, prompts, cfg, samples: int) -> float:
    ids = [encoder.prompt(p.prompt) for p in prompts] * samples
    seeds = [derive_seed(0, i) for i in range(len(ids))]
    return sum(checker_scores(encoder, prompts * samples, sample_responses(model, ids, seeds, cfg, encoder.end))) / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--run-dir", default=None, help="a run with sft and reward (default: the config's)")
    parser.add_argument("--tasks", nargs="+", default=["count"])
    parser.add_argument("--train-prompts", type=int, default=400)
    parser.add_argument("--heldout-prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rollout-prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--drop-answers", nargs="*", default=[], help="leave out questions with these answers")
    parser.add_argument("--max-operand", type=int, default=None, help="arithmetic operands (default: the config's)")
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out prompt for sampled accuracy")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    config = load(args.config)
    run = RunDir(args.run_dir or config.run_dir)
    for stage in ("sft", "reward"):
        if not run.manifest(stage).is_file():
            sys.exit(f"{run.stage(stage)} has not completed: run `make demo` (or llmpipe run) first")
    cfg = config.ppo.model_copy(update={
        "advantage": "grpo", "reward": "checker", "max_steps": args.steps, "lr": args.lr, "epochs": 1,
        "rollout_prompts": args.rollout_prompts, "group_size": args.group_size, "checkpoint_every": 0,
        "eval_prompts": args.heldout_prompts})
    encoder = ChatEncoder(load_tokenizer(run.tokenizer_dir))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, heldout = write_prompts(work, args.tasks, args.train_prompts, args.heldout_prompts, config.run.seed,
                                       config.instruct.heldout_fraction, args.max_operand or config.instruct.max_operand,
                                       tuple(args.drop_answers))
        t0 = time.perf_counter()
        result = run_ppo(config.model, cfg, sft_dir=run.stage("sft"), reward_dir=run.stage("reward"),
                         tokenizer_dir=run.tokenizer_dir, prompts=[train], heldout=[heldout], out_dir=work / "grpo",
                         seed=config.run.seed)
        wall = time.perf_counter() - t0
        prompts = load_prompts([heldout], RowCounts("heldout"))
        answers = Counter(p.answer for p in prompts)
        majority, majority_n = answers.most_common(1)[0]  # what always giving one answer scores
        sampled = {name: sampled_accuracy(load_release(folder), encoder, prompts, cfg, args.samples)
                   for name, folder in (("sft", run.stage("sft")), ("grpo", work / "grpo"))}
    print(f"\nGRPO + checker on {', '.join(args.tasks)}: {args.steps} steps of {args.rollout_prompts} prompts x "
          f"{args.group_size} samples, lr {args.lr}, {wall:.0f} s; {len(prompts)} held-out prompts\n")
    print(f"| model | greedy accuracy | sampled accuracy (x{args.samples}) | KL to SFT (nats/answer) |")
    print("|---|---|---|---|")
    print(f"| sft | {result['task_accuracy_sft']:.3f} | {sampled['sft']:.3f} | 0 |")
    print(f"| grpo | {result['task_accuracy']:.3f} | {sampled['grpo']:.3f} | {result['heldout_kl']:.3f} |")
    print(f"| always {majority!r} | {majority_n / len(prompts):.3f} | | |")


if __name__ == "__main__":
    main()
