"""The `pretrain` stage: next-token training of the transformer on the Arrow shards.

    python -m llmpipe.training.pretrain --config configs/tiny.yaml [--set pretrain.max_steps=20]

Writes `checkpoints/step_NNNNNNN/` while training (a rerun with the same config resumes from the
newest complete one, exactly), then `model.safetensors` + `model_config.json` (release weights
for export, generation and the next phases) and `train_config.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from llmpipe.config import ModelSection, PretrainSection
from llmpipe.context import StageContext
from llmpipe.data.loader import TokenLoader
from llmpipe.data.shards import load_split
from llmpipe.model.model import flops_per_token, next_token_loss, parameter_count
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training.trainer import (
    Trainer,
    TrainTask,
    measured_cpu_peak,
    peak_flops,
    peak_memory_mb,
    steady_tokens_per_s,
)

UNIGRAM_SAMPLE = 1 << 27  # tokens read for the unigram entropy


def unigram_entropy(streams: list[np.ndarray], vocab_size: int, limit: int = UNIGRAM_SAMPLE) -> float:
    """Entropy in nats of the token frequencies (first `limit` tokens): the loss of a model without context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    left = limit
    for stream in streams:
        part = stream[:left]
        counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
        left -= len(part)
        if left <= 0:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def next_token_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The step function: mean cross-entropy of the next token, x and y each (B, T)."""
    x, y = batch
    return model(x, y), {}


def run_pretrain(model_cfg: ModelSection, cfg: PretrainSection, shards_dir: Path, out_dir: Path, seed: int,
                 tracker: Tracker | None = None, *, init_from: Path | None = None, stop_after: int | None = None,
                 verify: bool = True, continue_from: Path | None = None) -> dict:
    """Train (or resume) into `out_dir`; return the final numbers.

    Runs in one process, or on every rank of a torchrun job (rank and world size from its
    environment; the process group is joined here): only rank 0 writes files and logs to
    `tracker`. `init_from`: start from these weights (a model.safetensors) instead of a random
    init. `stop_after` simulates a kill (tests).
    """
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    trainer = Trainer(model_cfg, cfg, seed=seed, init_from=init_from, loss_fn=next_token_loss, section="pretrain")
    main, dp_rank, dp_size, micro = trainer.env.is_main, trainer.dp_rank, trainer.dp_size, trainer.micro_batch_size
    config = {"model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json"), "seed": seed}

    train_streams = load_split(shards_dir, "train", verify=verify and main)
    val_streams = load_split(shards_dir, "val", verify=verify and main)
    train_loader = TokenLoader(train_streams, model_cfg.seq_len, micro, seed=seed, rank=dp_rank, world_size=dp_size)
    val_loader, eval_steps = None, 0
    if sum(max(0, (len(s) - 1) // model_cfg.seq_len) for s in val_streams) >= micro * dp_size:
        val_loader = TokenLoader(val_streams, model_cfg.seq_len, micro, seed=seed,
                                 rank=dp_rank, world_size=dp_size, shuffle=False)
        # cfg.eval_steps micro-batches of one process, shared by the data-parallel ranks (the same
        # windows on any number of ranks), and never a validation window twice
        eval_steps = min(-(-cfg.eval_steps // dp_size), val_loader.total_windows // (micro * dp_size))
    fpt = flops_per_token(model_cfg)
    task = TrainTask("pretrain", next_token_step, train_loader, flops_per_token=fpt, val_loader=val_loader,
                     eval_steps=eval_steps, split_batch=lambda batch: batch)

    ckpt_root = out_dir / "checkpoints"
    state = trainer.resume(ckpt_root, task)
    until = None
    if continue_from is not None:
        previous = json.loads((Path(continue_from) / "manifest.json").read_text())["counts"]["steps"]
        until = int(previous) + cfg.refresh_steps
        if state.step == 0:  # not a resumed continuation: start where the previous run ended
            state = trainer.continue_from(Path(continue_from) / "checkpoints")
    resumed_from, resumed_tokens = state.step, state.tokens
    state = trainer.fit(task, state, ckpt_root=ckpt_root, config=config, tracker=tracker, stop_after=stop_after,
                        until=until)

    device = trainer.device
    peak = peak_flops(device, trainer.dtype, cfg.peak_flops)
    if device.type == "cpu" and cfg.peak_flops is None:  # other processes may have shared the cores at start
        peak = max(peak, measured_cpu_peak())
    tokens_per_s = steady_tokens_per_s(state, state.step - resumed_from, state.tokens - resumed_tokens)
    result = {
        "steps": state.step,
        "tokens": state.tokens,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss if state.val_loss is not None else math.nan,
        "unigram_entropy": unigram_entropy(train_streams, model_cfg.vocab_size) if main else math.nan,
        "parameters": parameter_count(model_cfg),
        "flops_per_token": fpt,
        "timing": {  # this run's: MLflow only
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * fpt / (peak * trainer.env.world_size),
            "peak_flops": peak,
            "peak_mem_mb": peak_memory_mb(device),
            "train_time_s": state.train_time_s,
            "first_step_s": state.first_step_s,
        },
        "resumed_from_step": resumed_from,
        **({"continued_from_step": until - cfg.refresh_steps} if until is not None else {}),
        "accumulation": trainer.accumulation,
        "world_size": trainer.env.world_size,
    }
    if stop_after is not None and state.step < (until or cfg.max_steps):
        return result
    trainer.save_release(out_dir, config, tracker)
    return result


def pretrain_stage(ctx: StageContext, model_cfg: ModelSection, cfg: PretrainSection) -> dict:
    """The registered stage: shards from the run's shard stage, outputs in ctx.out_dir."""
    return run_pretrain(model_cfg, cfg, ctx.inputs["shards"], ctx.out_dir, ctx.seed, ctx.tracker,
                        continue_from=ctx.inputs.get("continue_from"))


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("pretrain")
