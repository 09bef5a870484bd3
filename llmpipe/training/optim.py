"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from llmpipe.config import TrainSection


def param_groups(model: torch.nn.Module, cfg: TrainSection) -> list[dict]:
    """Weight decay on 2-D parameters (linear weights, embeddings); none on norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_defaults(cfg: TrainSection, device: torch.device | str = "cpu") -> dict:
    """AdamW's arguments. The fused kernel, on CPU as on CUDA: one pass over each parameter instead of
    foreach's dozen (tiny preset on 2 cores: 1.4 ms per step against 6-10 ms)."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **({"fused": True} if fused else {})}


def build_optimizer(model: torch.nn.Module, cfg: TrainSection, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), **adamw_defaults(cfg, device))


def lr_at(step: int, cfg: TrainSection) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to a floor."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.max_steps <= warmup + 1:
        return cfg.lr
    progress = min(1.0, (step - warmup) / (cfg.max_steps - warmup - 1))
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
