"""The `pretrain` stage: next-token training of the transformer on the Arrow shards.

    python -m llmpipe.training.pretrain --config configs/tiny.yaml [--set pretrain.max_steps=20]

Writes `checkpoints/step_NNNNNNN/` while training (a rerun with the same config resumes from the
newest complete one, exactly), then `model.safetensors` + `model_config.json` (release weights
for export, generation and the next phases) and `train_config.json`.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from llmpipe import io
from llmpipe.config import ModelSection, PretrainSection
from llmpipe.data.loader import TokenLoader
from llmpipe.data.shards import load_split
from llmpipe.errors import BadValue
from llmpipe.model.model import Transformer, flops_per_token, parameter_count
from llmpipe.model.release import save_release
from llmpipe.stages import StageContext
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training import checkpoint
from llmpipe.training.loop import (
    LoopState,
    autocast_dtype,
    measured_cpu_peak,
    peak_flops,
    peak_memory_mb,
    resolve_device,
    train,
)
from llmpipe.training.optim import build_optimizer

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


def accumulation_steps(model_cfg: ModelSection, cfg: PretrainSection, world_size: int = 1) -> int:
    per_micro = cfg.micro_batch_size * model_cfg.seq_len * world_size
    if cfg.batch_tokens % per_micro:
        raise BadValue(f"pretrain.batch_tokens={cfg.batch_tokens} must be a multiple of micro_batch_size * seq_len * "
                         f"world_size = {cfg.micro_batch_size} * {model_cfg.seq_len} * {world_size} = {per_micro}")
    return cfg.batch_tokens // per_micro


def run_pretrain(model_cfg: ModelSection, cfg: PretrainSection, shards_dir: Path, out_dir: Path, seed: int,
                 tracker: Tracker | None = None, *, rank: int = 0, world_size: int = 1,
                 stop_after: int | None = None, verify: bool = True) -> dict:
    """Train (or resume) into `out_dir`; return the final numbers. `stop_after` simulates a kill (tests)."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.dtype, device)
    accumulation = accumulation_steps(model_cfg, cfg, world_size)
    config = {"model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json"), "seed": seed}

    train_streams = load_split(shards_dir, "train", verify=verify)
    val_streams = load_split(shards_dir, "val", verify=verify)
    train_loader = TokenLoader(train_streams, model_cfg.seq_len, cfg.micro_batch_size, seed=seed,
                               rank=rank, world_size=world_size)
    val_loader = None
    if sum(max(0, (len(s) - 1) // model_cfg.seq_len) for s in val_streams) >= cfg.micro_batch_size * world_size:
        val_loader = TokenLoader(val_streams, model_cfg.seq_len, cfg.micro_batch_size, seed=seed,
                                 rank=rank, world_size=world_size, shuffle=False)
        eval_steps = min(cfg.eval_steps, val_loader.total_windows // (cfg.micro_batch_size * world_size))
        cfg = cfg.model_copy(update={"eval_steps": eval_steps})  # never count a validation window twice

    torch.manual_seed(seed)
    model = Transformer(model_cfg).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    ckpt_root = out_dir / "checkpoints"
    state, resumed_from = LoopState(), 0
    latest = checkpoint.latest(ckpt_root)
    if latest is not None:
        saved = checkpoint.load(latest, model, optimizer, verified=True)
        train_loader.load_state_dict(saved["loader"])
        state = LoopState(**{f.name: saved[f.name] for f in fields(LoopState)})
        resumed_from = state.step
        print(f"resuming from {latest} (step {state.step})", flush=True)
    forward = torch.compile(model) if cfg.compile else model

    fpt = flops_per_token(model_cfg)
    peak = peak_flops(device, dtype, cfg.peak_flops)
    state = train(model, optimizer, cfg, train_loader, val_loader, accumulation=accumulation, device=device,
                  ckpt_root=ckpt_root, config=config, state=state, flops_per_token=fpt, peak=peak,
                  tracker=tracker, forward=forward, world_size=world_size, stop_after=stop_after,
                  show_progress=rank == 0)

    if device.type == "cpu" and cfg.peak_flops is None:  # other processes may have shared the cores at start
        peak = max(peak, measured_cpu_peak())
    tokens_per_s = state.tokens / state.train_time_s if state.train_time_s else 0.0
    result = {
        "steps": state.step,
        "tokens": state.tokens,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss if state.val_loss is not None else math.nan,
        "unigram_entropy": unigram_entropy(train_streams, model_cfg.vocab_size),
        "parameters": parameter_count(model_cfg),
        "flops_per_token": fpt,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * fpt / peak,
        "peak_flops": peak,
        "peak_mem_mb": peak_memory_mb(device),
        "train_time_s": state.train_time_s,
        "resumed_from_step": resumed_from,
        "accumulation": accumulation,
    }
    if stop_after is not None and state.step < cfg.max_steps:
        return result
    if rank == 0:
        save_release(model, out_dir)
        io.write_json(out_dir / "train_config.json", config)
        # the final weights and configs; the optimizer state stays in checkpoints/ (3x the weights)
        for name in ("model.safetensors", "model_config.json", "train_config.json"):
            tracker.log_artifact(out_dir / name)
    return result


def pretrain_stage(ctx: StageContext, model_cfg: ModelSection, cfg: PretrainSection) -> dict:
    """The registered stage: shards from the run's shard stage, outputs in ctx.out_dir."""
    return run_pretrain(model_cfg, cfg, ctx.inputs["shards"], ctx.out_dir, ctx.seed, ctx.tracker)


if __name__ == "__main__":
    from llmpipe.cli import stage_main

    stage_main("pretrain")
