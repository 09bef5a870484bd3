"""The training loop: accumulate, clip, step, log, evaluate, checkpoint, guard against divergence.

It gets everything built (model, optimizer, loaders) and knows nothing of stages or run folders;
`pretrain.py` assembles the pieces and resumes. Later phases (SFT) reuse it with their loaders.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmpipe.config import PretrainSection
from llmpipe.data.loader import TokenLoader
from llmpipe.errors import UserError
from llmpipe.progress import progress
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training import checkpoint
from llmpipe.training.optim import lr_at, set_lr

# dense bf16 peak FLOP/s by device name, for MFU on GPUs (CPUs are measured instead)
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12,
                 "L40S": 362e12, "L4": 121e12, "4090": 165e12}


class TrainingDiverged(UserError):
    """The loss became NaN/inf or spiked; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("pretrain.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU (bf16 matmuls are ~3x slower on these CPUs)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def measured_cpu_peak(size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of a large fp32 matmul on this process's threads: the CPU's practical peak."""
    g = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype | None, configured: float | None = None) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 989e12)
        return peak if dtype == torch.bfloat16 else peak / 2  # tf32 is half the bf16 rate
    return measured_cpu_peak()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: TokenLoader | None, steps: int, device: torch.device,
             dtype: torch.dtype | None) -> float | None:
    """Mean loss over the first `steps` micro-batches of an unshuffled loader (same every time)."""
    if loader is None:
        return None
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "position": 0})
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast(device, dtype):
            total += model(x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / steps


@dataclass
class LoopState:
    """What the loop carries from step to step; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (all ranks)
    train_time_s: float = 0.0  # wall time inside training steps (no eval, no checkpoint)
    loss_ema: float | None = None  # running mean for the spike guard
    train_loss: float | None = None  # loss of the last step
    val_loss: float | None = None  # last validation loss
    history: list = field(default_factory=list)  # (step, val_loss) pairs

    def to_json(self) -> dict:
        return dict(self.__dict__)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: PretrainSection, train_loader: TokenLoader,
          val_loader: TokenLoader | None, *, accumulation: int, device: torch.device, ckpt_root: Path,
          config: dict, state: LoopState, flops_per_token: float, peak: float, tracker: Tracker | None = None,
          forward: torch.nn.Module | None = None, world_size: int = 1, stop_after: int | None = None,
          show_progress: bool = True) -> LoopState:
    """Run optimizer steps state.step .. cfg.max_steps-1 and return the final state.

    `model` is what is checkpointed; `forward` (default: model) is what is called, e.g. its
    compiled wrapper. `stop_after` ends the loop after that step as if the process were killed
    (tests of resume).
    """
    tracker = tracker or NullTracker()
    forward = forward or model
    dtype = autocast_dtype(cfg.dtype, device)
    tokens_per_step = accumulation * train_loader.batch_size * train_loader.seq_len * world_size
    last_good = checkpoint.newest(ckpt_root)  # named in the divergence message; resuming verified it
    start_step, saved_step = state.step, None
    model.train()

    def save(step: int) -> Path:
        nonlocal last_good, saved_step
        saved_step = step
        payload = {**state.to_json(), "loader": train_loader.state_dict(),
                   "scheduler": {"step": step, "lr": lr_at(max(step - 1, 0), cfg)}}
        last_good = checkpoint.save(ckpt_root, step, model, optimizer, payload, config, cfg.keep_checkpoints)
        return last_good

    window_tokens, window_time = 0, 0.0
    bar = progress(cfg.max_steps, "pretrain", unit="step", initial=state.step, enabled=show_progress)
    while state.step < cfg.max_steps:
        step = state.step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        loss_sum = 0.0
        for _ in range(accumulation):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, dtype):
                loss = forward(x, y) / accumulation
            loss.backward()
            loss_sum += loss.detach()
        loss_value = float(loss_sum)
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
        _guard(step, loss_value, grad_norm, state, cfg, last_good)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0

        state.step = step + 1
        state.tokens += tokens_per_step
        state.train_time_s += dt
        state.train_loss = loss_value
        state.loss_ema = loss_value if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss_value
        window_tokens, window_time = window_tokens + tokens_per_step, window_time + dt
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            tps = window_tokens / window_time
            tracker.log_metrics({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                 "train/tokens_per_s": tps, "train/mfu": tps * flops_per_token / peak,
                                 "train/peak_mem_mb": peak_memory_mb(device), "train/tokens": state.tokens},
                                step=state.step)
            bar.write(f"step {state.step:6d}/{cfg.max_steps} loss {loss_value:.4f} lr {lr:.2e} "
                      f"gnorm {grad_norm:.3f} tok/s {tps:,.0f} mfu {tps * flops_per_token / peak:.1%}")
            window_tokens, window_time = 0, 0.0
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            state.val_loss = evaluate(forward, val_loader, cfg.eval_steps, device, dtype)
            if state.val_loss is not None:
                state.history.append((state.step, state.val_loss))
                tracker.log_metrics({"val/loss": state.val_loss}, step=state.step)
                bar.write(f"step {state.step:6d} val loss {state.val_loss:.4f}")
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
            save(state.step)
        if stop_after is not None and state.step >= stop_after:
            bar.close()
            return state
    bar.close()

    if not state.history or state.history[-1][0] != state.step:
        state.val_loss = evaluate(forward, val_loader, cfg.eval_steps, device, dtype)
        if state.val_loss is not None:
            state.history.append((state.step, state.val_loss))
            tracker.log_metrics({"val/loss": state.val_loss}, step=state.step)
    if state.step != start_step and saved_step != state.step:  # the final state, unless just saved or resumed
        save(state.step)
    return state


def _guard(step: int, loss: float, grad_norm: float, state: LoopState, cfg: PretrainSection, last_good: Path | None) -> None:
    """Stop before the optimizer step when the loss or gradient is not finite, or the loss spikes."""
    keep = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"step {step + 1}: loss {loss} / grad norm {grad_norm} is not finite; "
                               f"stopped before the optimizer step; {keep}")
    if cfg.spike_factor and step >= cfg.spike_warmup and state.loss_ema is not None and loss > cfg.spike_factor * state.loss_ema:
        raise TrainingDiverged(f"step {step + 1}: loss {loss:.4f} is {loss / state.loss_ema:.1f}x its running mean "
                               f"{state.loss_ema:.4f} (pretrain.spike_factor={cfg.spike_factor}); stopped before the "
                               f"optimizer step; {keep}. Lower pretrain.lr or raise pretrain.spike_factor (a changed config "
                               f"starts the stage over).")
