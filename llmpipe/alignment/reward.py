"""The `reward` stage: a reward model trained on preference pairs (Bradley-Terry), from SFT.

    python -m llmpipe.alignment.reward --config configs/tiny.yaml [--set reward.center_coef=0.01]

The SFT transformer with a scalar head in place of its language-model head
(`Transformer(head="score")`, Hugging Face's `LlamaForSequenceClassification` with one label),
its score read at the last token of the rendered conversation (the closing `<|end|>`). With
scores r_c and r_r of the chosen and rejected conversations:

    loss = -logsigmoid(r_c - r_r) + center_coef * (r_c + r_r)^2        (means over the pairs)

the second term being TRL's `center_rewards_coefficient`, which keeps scores near zero. The
pairs are DPO's (same loader, same rendering, same `max_length` rule). Logged: the scores of
chosen and rejected, their margin and the pairwise accuracy; at the end the held-out pairwise
accuracy and mean margin of every held-out pair go to the manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmpipe.alignment.data import RowCounts, load_preferences
from llmpipe.alignment.render import ChatEncoder, EncodedPair, encode_pairs, pair_score_batch, scores_at
from llmpipe.config import ModelSection, RewardSection
from llmpipe.context import StageContext, as_paths
from llmpipe.data.loader import RowLoader
from llmpipe.errors import BadValue
from llmpipe.model.model import flops_per_token
from llmpipe.model.release import WEIGHTS, load_release
from llmpipe.progress import progress
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training.trainer import Trainer, TrainTask


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The mean Bradley-Terry loss of scores (B,) of chosen and rejected, and TRL's metrics."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                  "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}


def reward_step_fn(cfg: RewardSection):
    def step(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        scores = scores_at(forward(batch["input_ids"]), batch["last"]).float()  # (2B,): chosen rows, then rejected
        half = scores.shape[0] // 2
        return reward_loss(scores[:half], scores[half:], cfg.center_coef)

    return step


@torch.no_grad()
def pair_scores(model: torch.nn.Module, pairs: list[EncodedPair], batch_size: int,
                label: str = "") -> tuple[list[float], list[float]]:
    """The score model's scores of each pair's chosen and rejected conversation, in order."""
    device = model.tok_emb.weight.device
    chosen, rejected = [], []
    bar = progress(len(pairs), label, unit="pair")
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in pair_score_batch(pairs[start:start + batch_size]).items()}
        scores = scores_at(model(batch["input_ids"]), batch["last"]).double().cpu()
        half = len(scores) // 2
        chosen += scores[:half].tolist()
        rejected += scores[half:].tolist()
        bar.update(half)
    bar.close()
    return chosen, rejected


def pairwise_accuracy(chosen: list[float], rejected: list[float]) -> float:
    return sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(chosen))


def run_reward(model_cfg: ModelSection, cfg: RewardSection, *, init_from: Path, tokenizer_dir: Path, data: list[Path],
               heldout: list[Path], out_dir: Path, seed: int, tracker: Tracker | None = None,
               stop_after: int | None = None) -> dict:
    """Train the reward model from the SFT weights `init_from` into `out_dir`; return the stage's numbers."""
    tracker, out_dir = tracker or NullTracker(), Path(out_dir)
    max_length = cfg.max_length or model_cfg.seq_len
    encoder = ChatEncoder(load_tokenizer(tokenizer_dir))
    counts, heldout_counts = RowCounts("reward.data"), RowCounts("reward.heldout_data")
    train_pairs = encode_pairs(encoder, load_preferences(data, counts), max_length, counts)
    heldout_pairs = encode_pairs(encoder, load_preferences(heldout, heldout_counts), max_length, heldout_counts)

    trainer = Trainer(model_cfg, cfg, seed=seed, init_from=init_from, section="reward", head="score")
    if trainer.parallel.schedule is not None or trainer.parallel.layout.tp > 1:
        raise BadValue(f"reward.parallel.strategy={cfg.parallel.strategy} is not supported for the score head; "
                       "use ddp, zero1, zero2 or fsdp")
    micro, dp = trainer.micro_batch_size, trainer.dp_size
    train_loader = RowLoader(train_pairs, micro, pair_score_batch, seed=seed, rank=trainer.dp_rank, world_size=dp)
    val_loader = RowLoader(heldout_pairs, micro, pair_score_batch, seed=seed, rank=trainer.dp_rank, world_size=dp,
                           shuffle=False)
    task = TrainTask("reward", reward_step_fn(cfg), train_loader,
                     flops_per_token=flops_per_token(model_cfg, head="score"),
                     val_loader=val_loader, eval_steps=max(1, len(heldout_pairs) // (micro * dp)))
    config = {"model": model_cfg.model_dump(mode="json"), "reward": cfg.model_dump(mode="json"), "seed": seed}
    state, result = trainer.resume_and_fit(task, out_dir, config, tracker, stop_after)
    result.update({
        "pairs": len(train_pairs),
        "heldout_pairs": len(heldout_pairs),
        "data": {"train": counts.to_manifest(), "heldout": heldout_counts.to_manifest()},
    })
    if stop_after is not None and state.step < cfg.max_steps:
        return result
    trainer.save_release(out_dir, config, tracker)
    if trainer.env.is_main:
        chosen, rejected = pair_scores(load_release(out_dir), heldout_pairs, micro, "held-out pairs")
        result["heldout_pairwise_accuracy"] = pairwise_accuracy(chosen, rejected)
        result["heldout_margin"] = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    return result


def reward_stage(ctx: StageContext, model_cfg: ModelSection, cfg: RewardSection) -> dict:
    """The registered stage: the SFT weights, the run's tokenizer and the preference pairs of
    `reward.data` (default: the instruct stage's)."""
    return run_reward(model_cfg, cfg, init_from=ctx.inputs["sft"] / WEIGHTS, tokenizer_dir=ctx.inputs["tokenizer"],
                      data=as_paths(ctx.inputs["data"]), heldout=as_paths(ctx.inputs["heldout"]),
                      out_dir=ctx.out_dir, seed=ctx.seed, tracker=ctx.tracker)


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("reward")
