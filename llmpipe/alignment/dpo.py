"""The `dpo` stage: direct preference optimisation of the SFT model against its cached reference.

    python -m llmpipe.alignment.dpo --config configs/tiny.yaml [--set dpo.beta=0.2]

With completion log-probs p (policy) and r (reference, from `dpo_reference`) of the chosen (c)
and rejected (r) completions, margin = (p_c - r_c) - (p_r - r_r):
  * `dpo.loss: sigmoid` (DPO, the default): -logsigmoid(beta * margin);
  * `dpo.loss: ipo`: (margin - 1 / (2 beta))^2 on log-probs averaged over each completion's
    tokens, as TRL computes IPO.
Logged as TRL does: rewards/chosen = beta (p_c - r_c), rewards/rejected, rewards/margins,
rewards/accuracies. The held-out preference accuracy (chosen more likely than rejected) of the
SFT model (from the cache) and of the DPO model go to the manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmpipe import io
from llmpipe.alignment.data import RowCounts, load_preferences
from llmpipe.alignment.dpo_reference import HELDOUT_FILE, TRAIN_FILE, pair_logps, pref_accuracy, read_table
from llmpipe.alignment.render import ChatEncoder, EncodedPair, completion_logps, encode_pairs, pair_batch
from llmpipe.config import DPOSection, ModelSection
from llmpipe.context import StageContext, as_paths
from llmpipe.data.loader import RowLoader
from llmpipe.errors import BadValue, UserError
from llmpipe.model.model import flops_per_token
from llmpipe.model.release import WEIGHTS, load_release
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training.trainer import Trainer, TrainTask


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """Per-pair losses (B,) and TRL's reward metrics from the four completion log-probs (B,)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise BadValue(f"dpo.loss={loss!r}: allowed values: sigmoid, ipo")
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses, {"rewards/chosen": chosen_reward.mean(), "rewards/rejected": rejected_reward.mean(),
                    "rewards/margins": (chosen_reward - rejected_reward).mean(),
                    "rewards/accuracies": (chosen_reward > rejected_reward).float().mean()}


def dpo_step_fn(cfg: DPOSection, reference: torch.nn.Module | None = None):
    """The step function. The reference log-probs come with the batch (the cache), or, with a
    `reference` model, from its forward in every step (what the cache saves; benchmarks)."""

    def step(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logps = completion_logps(forward, batch)  # (2B,): chosen rows, then rejected
        if reference is None:
            ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps.dtype)
        else:
            with torch.no_grad():
                ref = completion_logps(reference, batch).to(logps.dtype)
        if cfg.loss == "ipo":  # per-token means, as TRL's IPO
            lengths = (batch["targets"] != -1).sum(dim=-1).clamp(min=1)
            logps, ref = logps / lengths, ref / lengths
        half = logps.shape[0] // 2
        losses, metrics = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], cfg.beta, cfg.loss)
        return losses.mean(), metrics

    return step


def with_reference(pairs: list[EncodedPair], table, label: str) -> list[tuple[EncodedPair, float, float]]:
    """Each pair with its cached reference log-probs; the cache must hold exactly these pairs."""
    index = table["index"].to_pylist()
    if index != [p.index for p in pairs]:
        raise UserError(f"the reference cache ({label}) does not hold the pairs of the preference data; "
                        "rebuild it: llmpipe run --config CONFIG --force dpo_reference")
    return list(zip(pairs, table["chosen_logp"].to_pylist(), table["rejected_logp"].to_pylist()))


def collate_pairs(items: list[tuple[EncodedPair, float, float]]) -> dict[str, torch.Tensor]:
    batch = pair_batch([pair for pair, _, _ in items])
    batch["ref_chosen"] = torch.tensor([c for _, c, _ in items], dtype=torch.float64)
    batch["ref_rejected"] = torch.tensor([r for _, _, r in items], dtype=torch.float64)
    return batch


def run_dpo(model_cfg: ModelSection, cfg: DPOSection, *, init_from: Path, reference_dir: Path, tokenizer_dir: Path,
            data: list[Path], heldout: list[Path], out_dir: Path, seed: int, max_length: int,
            tracker: Tracker | None = None, stop_after: int | None = None) -> dict:
    tracker, out_dir = tracker or NullTracker(), Path(out_dir)
    encoder = ChatEncoder(load_tokenizer(tokenizer_dir))
    counts, heldout_counts = RowCounts("dpo.data"), RowCounts("dpo.heldout_data")
    train_pairs = encode_pairs(encoder, load_preferences(data, counts), max_length, counts)
    heldout_pairs = encode_pairs(encoder, load_preferences(heldout, heldout_counts), max_length, heldout_counts)
    train_items = with_reference(train_pairs, read_table(reference_dir, TRAIN_FILE), TRAIN_FILE)
    heldout_table = read_table(reference_dir, HELDOUT_FILE)
    heldout_items = with_reference(heldout_pairs, heldout_table, HELDOUT_FILE)

    trainer = Trainer(model_cfg, cfg, seed=seed, init_from=init_from, section="dpo")
    if trainer.parallel.schedule is not None:
        raise BadValue("dpo.parallel.strategy=pp is not supported; use ddp, zero1, zero2, fsdp, tp or fsdp_tp")
    micro, dp = trainer.micro_batch_size, trainer.dp_size
    train_loader = RowLoader(train_items, micro, collate_pairs, seed=seed, rank=trainer.dp_rank, world_size=dp)
    val_loader = RowLoader(heldout_items, micro, collate_pairs, seed=seed, rank=trainer.dp_rank, world_size=dp,
                           shuffle=False)
    # a pair is two sequences (chosen, rejected): 2x the forward/backward of SFT's per row
    task = TrainTask("dpo", dpo_step_fn(cfg), train_loader, flops_per_token=flops_per_token(model_cfg),
                     val_loader=val_loader, eval_steps=max(1, len(heldout_items) // (micro * dp)))
    config = {"model": model_cfg.model_dump(mode="json"), "dpo": cfg.model_dump(mode="json"), "seed": seed}
    state, result = trainer.resume_and_fit(task, out_dir, config, tracker, stop_after)
    result.update({
        "pairs": len(train_items),
        "heldout_pairs": len(heldout_items),
        "pref_accuracy_sft": pref_accuracy(heldout_table),
        "data": {"train": counts.to_manifest(), "heldout": heldout_counts.to_manifest()},
    })
    if stop_after is not None and state.step < cfg.max_steps:
        return result
    trainer.save_release(out_dir, config, tracker)
    if trainer.env.is_main:
        policy = pair_logps(load_release(out_dir), heldout_pairs, micro, "held-out pairs")
        result["pref_accuracy"] = pref_accuracy(policy)
    return result


def reference_max_length(reference_dir: Path, model_cfg: ModelSection) -> int:
    """The max_length the reference cache was built with (its manifest's config), so DPO keeps its pairs."""
    manifest = io.read_manifest(reference_dir)
    return manifest["config"]["dpo_reference"]["max_length"] or model_cfg.seq_len


def dpo_stage(ctx: StageContext, model_cfg: ModelSection, cfg: DPOSection) -> dict:
    """The registered stage: the policy starts from SFT, against the cached reference."""
    return run_dpo(model_cfg, cfg, init_from=ctx.inputs["sft"] / WEIGHTS, reference_dir=ctx.inputs["reference"],
                   tokenizer_dir=ctx.inputs["tokenizer"], data=as_paths(ctx.inputs["data"]), heldout=as_paths(ctx.inputs["heldout"]),
                   out_dir=ctx.out_dir, seed=ctx.seed, max_length=reference_max_length(ctx.inputs["reference"], model_cfg),
                   tracker=ctx.tracker)


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("dpo")
