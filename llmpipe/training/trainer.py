"""The one training engine: every training stage (pretrain, SFT, reward, DPO, PPO) runs through it.

A stage builds a `Trainer` (model, parallel layout, optimizer: from the shared `TrainSection`),
asks it for its data-parallel rank and size to build its loaders, then hands it a `TrainTask`:

    trainer = Trainer(model_cfg, cfg, seed=seed, init_from=upstream / "model.safetensors")
    loader = TokenLoader(..., rank=trainer.dp_rank, world_size=trainer.dp_size)
    task = TrainTask("sft", step_fn, loader, val_loader=..., eval_steps=..., flops_per_token=...)
    state = trainer.resume(ckpt_root, task)            # LoopState() when there is no checkpoint
    state = trainer.fit(task, state, ckpt_root=..., config=..., tracker=...)
    trainer.save_release(out_dir)                      # rank 0 writes the gathered weights

`step_fn(forward, batch) -> (loss, metrics)`: the mean loss of one micro-batch (a scalar tensor
with a graph) and optional scalar metrics; the trainer scales, accumulates, all-reduces, clips,
guards, steps, logs, evaluates and checkpoints. Under pipeline parallelism the trainer calls the
schedule instead: a stage that can be pipelined also supplies `split_batch(batch) -> (inputs,
labels)` and gives `loss_fn(pred, labels)` to the Trainer; the schedule then runs the step's
micro-batches (concatenated) in one call.

Loss, grad norm and metrics are reduced over all ranks in one all-reduce before the guard, so
every rank takes the same decision. `on_step_end` callbacks run once per optimizer step on every
rank, after any checkpoint of that step (fault injection, profilers).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from llmpipe import io
from llmpipe.config import SHARDED_STRATEGIES, ModelSection, TrainSection
from llmpipe.distributed import env
from llmpipe.distributed.checkpoint import full_model_state, gathered_model_state, load_full_model_state
from llmpipe.distributed.parallelize import ParallelModel, parallelize, parallelize_frozen
from llmpipe.errors import BadValue, UserError
from llmpipe.faults import fault_point
from llmpipe.model.model import Transformer
from llmpipe.model.release import CONFIG as RELEASE_CONFIG
from llmpipe.model.release import WEIGHTS, load_weights, write_release
from llmpipe.progress import progress
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training import checkpoint
from llmpipe.training.optim import adamw_defaults, lr_at, param_groups, set_lr

# dense bf16 peak FLOP/s by device name, for MFU on GPUs (CPUs are measured instead)
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12,
                 "L40S": 362e12, "L4": 121e12, "4090": 165e12}

Batch = Any  # what a loader yields: a tensor, or a tuple / dict of tensors
StepFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingDiverged(UserError):
    """The loss became NaN/inf or spiked; the last good checkpoint is kept."""


class Loader(Protocol):
    """A stateful loader: its state (JSON) is saved in every checkpoint; `rewind` restarts it
    (validation loaders are read from the start at every evaluation)."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def rewind(self) -> None: ...


@dataclass
class TrainTask:
    """What a training stage supplies to the trainer."""

    name: str  # the stage and its config section ("pretrain"): labels, messages
    step_fn: StepFn
    train_loader: Loader  # micro-batches of Trainer.micro_batch_size sequences of model.seq_len tokens
    flops_per_token: float = 0.0  # training FLOPs per token, for MFU
    val_loader: Loader | None = None
    eval_steps: int = 0  # validation micro-batches per evaluation
    split_batch: Callable[[Batch], tuple[Any, Any]] | None = None  # pp: batch -> (inputs, labels)


@dataclass
class LoopState:
    """What the loop carries from step to step; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (all ranks)
    train_time_s: float = 0.0  # wall time inside this process's training steps (no eval, no checkpoint)
    first_step_s: float = 0.0  # of which this process's first step: compilation, first allocations
    loss_ema: float | None = None  # running mean for the spike guard
    train_loss: float | None = None  # loss of the last step
    val_loss: float | None = None  # last validation loss
    history: list = field(default_factory=list)  # (step, val_loss) pairs
    train_history: list = field(default_factory=list)  # (step, train_loss) at every log step: the training curve

    def to_json(self) -> dict:
        """All but the wall times: a checkpoint holds no run-specific value, so the same run saves the
        same bytes (a resumed run times only its own steps)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("train_time_s", "first_step_s")}


def steady_tokens_per_s(state: LoopState, steps: int, tokens: int) -> float:
    """Tokens/s of this process's steps after its first, which holds compilation and the first
    allocations (tens of seconds with `compile`); all steps when only one ran."""
    if steps > 1 and state.train_time_s > state.first_step_s:
        return tokens * (steps - 1) / steps / (state.train_time_s - state.first_step_s)
    return tokens / state.train_time_s if state.train_time_s else 0.0


def loop_summary(state: LoopState, resumed_from: int, trainer: "Trainer") -> dict:
    """What every training stage reports of its loop: steps, last losses, where it resumed, timing."""
    steps_per_s = (state.step - resumed_from) / state.train_time_s if state.train_time_s else 0.0
    return {"steps": state.step, "train_loss": state.train_loss, "heldout_loss": state.val_loss,
            "resumed_from_step": resumed_from,
            "timing": {"steps_per_s": steps_per_s, "peak_mem_mb": peak_memory_mb(trainer.device),
                       "train_time_s": state.train_time_s}}


# --- devices and numbers -------------------------------------------------------------------------


def resolve_device(name: str, section: str = "pretrain") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{section}.device=cuda but no CUDA device is available")
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


def accumulation_steps(cfg: TrainSection, tokens_per_batch: int, dp: int, section: str = "pretrain") -> int:
    """Micro-batches per optimizer step so that every step sees cfg.batch_tokens tokens."""
    per_micro = tokens_per_batch * dp
    if cfg.batch_tokens % per_micro:
        raise BadValue(f"{section}.batch_tokens={cfg.batch_tokens} must be a multiple of micro_batch_size * "
                       f"seq_len * data-parallel ranks = {tokens_per_batch} * {dp} = {per_micro}")
    return cfg.batch_tokens // per_micro


def _concat(batches: list[Batch]) -> Batch:
    """Micro-batches -> one batch (along the batch dimension), keeping the structure."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: _concat([b[k] for b in batches]) for k in first}
    return type(first)(_concat(list(parts)) for parts in zip(*batches))


def batch_tokens(batch: Batch) -> int:
    """Token slots a micro-batch computes, padding included (what MFU counts): its input ids'
    size (a dict's `input_ids`, a tuple's first tensor, or the tensor itself)."""
    if isinstance(batch, dict):
        return batch["input_ids"].numel()
    return (batch if isinstance(batch, torch.Tensor) else batch[0]).numel()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return type(batch)(_to_device(v, device) for v in batch)


# --- the model ---------------------------------------------------------------------------------


InitFrom = Path | dict[str, Path] | None  # a release's weights, or several under prefixes ({"policy": ..., "critic": ...})


def build_model(model_cfg: ModelSection, device: torch.device | str, init_from: InitFrom = None,
                head: str = "lm", build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The transformer (or what `build` makes: a module of Transformers) on `device`, initialised
    from the config, or with the weights of `init_from` (an upstream stage's model.safetensors).
    On the meta device nothing is allocated: the trainer parallelizes it first, then
    `materialize`s each rank's shards."""
    with torch.device(device):
        model = build() if build is not None else Transformer(model_cfg, head=head)
    if init_from is not None and str(device) != "meta":
        load_init([model], init_from)
    return model


def load_init(parts: list[nn.Module], init_from: InitFrom) -> None:
    """Upstream weights into `parts`. A score model started from a language model (the reward
    model from SFT) keeps its seeded score head: the file has none, and its LM head is unused."""
    if isinstance(init_from, dict):
        state = {f"{prefix}.{k}": v for prefix, path in init_from.items() for k, v in load_weights(path).items()}
    else:
        state = load_weights(init_from)
    heads = tuple(name for part in parts for name, _ in part.named_parameters() if name.endswith("score.weight"))
    load_full_model_state(parts, state, missing_ok=heads)


def materialize(parts: list[nn.Module], device: torch.device, seed: int, init_from: InitFrom = None) -> None:
    """Allocate meta-device parts on `device` and initialise them where they live (or load `init_from`)."""
    torch.manual_seed(seed)
    for part in parts:
        part.to_empty(device=device)
        part.init_weights()  # also the rotary tables, which no weights file holds
    if init_from is not None:
        load_init(parts, init_from)


class Trainer:
    """Model, parallel layout and optimizer for one training stage; `fit` runs the steps."""

    def __init__(self, model_cfg: ModelSection, cfg: TrainSection, *, seed: int, init_from: InitFrom = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 section: str = "pretrain", head: str = "lm", build: Callable[[], nn.Module] | None = None):
        """`head`: the Transformer's head ("lm", "score"); `build`: makes the model instead, a module
        of Transformers trained together (PPO's policy and critic), with `init_from` a dict of
        weights files by submodule name."""
        self.model_cfg, self.cfg, self.section, self.head, self.seed = model_cfg, cfg, section, head, seed
        self.env = env.init_distributed(resolve_device(cfg.device, section).type)
        if self.env.world_size not in (1, cfg.world_size):
            raise BadValue(f"{section}.nproc * nnodes = {cfg.world_size}, but {self.env.world_size} processes were started")
        self.device = self.env.device
        self.dtype = autocast_dtype(cfg.dtype, self.device)
        self.layout = env.Layout.of(cfg.parallel, self.env.world_size)
        self.micro_batch_size = cfg.micro_batch_for(model_cfg.seq_len, self.layout.dp)  # sequences, on one rank
        self.tokens_per_micro_batch = self.micro_batch_size * model_cfg.seq_len
        self.accumulation = accumulation_steps(cfg, self.tokens_per_micro_batch, self.layout.dp, section)
        self.mesh = env.build_mesh(self.layout, self.device.type)
        # sharded strategies build on the meta device: a model larger than one host's memory
        # exists only as its shards. Not on CPU: DTensor's random init is CUDA-only, so there every
        # shard would get the same numbers (duplicate heads, rows); CPU ranks build the whole model
        # seeded, as one process does, and parallelize keeps their pieces
        self.on_meta = self.env.world_size > 1 and self.device.type == "cuda" and (
            cfg.parallel.strategy in SHARDED_STRATEGIES or self.layout.tp > 1 or self.layout.pp > 1)
        torch.manual_seed(seed)
        model = build_model(model_cfg, "meta" if self.on_meta else self.device, None if self.on_meta else init_from,
                            head, build)
        self.fsdp_dtype = self.dtype if cfg.parallel.strategy in SHARDED_STRATEGIES and self.device.type == "cuda" else None
        self.parallel: ParallelModel = parallelize(model, self.mesh, cfg, device=self.device, param_dtype=self.fsdp_dtype,
                                                   loss_fn=loss_fn, pp_microbatches=self.accumulation)
        if self.on_meta:
            materialize(self.parallel.model_parts, self.device, seed, init_from)
        self._rollout_copy: Transformer | None = None
        self.autocast_dtype = None if self.parallel.mixed_precision else self.dtype
        self.optimizers = [self.parallel.build_optimizer(param_groups(part, cfg), torch.optim.AdamW,
                                                         **adamw_defaults(cfg, self.device))
                           for part in self.parallel.model_parts]
        self.on_step_end: list[Callable[[LoopState], None]] = []  # called once per optimizer step, every rank
        self.on_step_end.append(lambda state: fault_point(section, f"step_{state.step}"))  # LLMPIPE_FAULT

    @property
    def dp_rank(self) -> int:
        return self.parallel.dp_rank

    @property
    def dp_size(self) -> int:
        return self.parallel.layout.dp

    @property
    def model_parts(self) -> list[nn.Module]:
        return self.parallel.model_parts

    # --- checkpoints -----------------------------------------------------------------------------

    def resume(self, ckpt_root: Path, task: TrainTask) -> LoopState:
        """Load the newest good checkpoint under `ckpt_root` (any layout wrote it) and the loader's
        position; a fresh LoopState when there is none."""
        latest = env.broadcast_object(checkpoint.latest(ckpt_root) if env.is_main() else None)
        if latest is None:
            return LoopState()
        saved = checkpoint.load(latest, self.model_parts, self.optimizers, verified=True)
        task.train_loader.load_state_dict(saved["loader"])
        state = LoopState(**{f.name: saved[f.name] for f in fields(LoopState) if f.name in saved})
        if self.env.is_main:
            print(f"resuming from {latest} (step {state.step})", flush=True)
        return state

    def continue_from(self, root: Path) -> LoopState:
        """Start from another run's final checkpoint under `root`: its weights, optimizer state, step
        and tokens (so the learning-rate schedule goes on from there); the loader starts the new data."""
        latest = env.broadcast_object(checkpoint.latest(root) if env.is_main() else None)
        if latest is None:
            raise io.ChecksumError(f"no complete checkpoint under {root} to continue from: "
                                   f"set {self.section}.refresh=restart, or rerun the stage with --force")
        saved = checkpoint.load(latest, self.model_parts, self.optimizers, verified=True)
        state = LoopState(**{f.name: saved[f.name] for f in fields(LoopState) if f.name in saved})
        if self.env.is_main:
            print(f"continuing from {latest} (step {state.step}) on new data", flush=True)
        return state

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole single-device state dict on CPU, gathered from every rank, on rank 0 (empty elsewhere)."""
        return full_model_state(self.model_parts, self.mesh)

    def submodel(self, part: str | None = None) -> nn.Module:
        """The trained model, or its submodule `part` (PPO's "policy", "critic"), as this rank holds it."""
        return self.model_parts[0] if part is None else getattr(self.model_parts[0], part)

    def frozen(self, init_from: Path, head: str = "lm") -> Transformer:
        """A model that is only run forward (a reference, a reward model), with the weights of
        `init_from`, in this trainer's layout (`parallelize_frozen`)."""
        model = build_model(self.model_cfg, "meta" if self.on_meta else self.device,
                            None if self.on_meta else init_from, head)
        model = parallelize_frozen(model, self.mesh, self.cfg, param_dtype=self.fsdp_dtype)
        if self.on_meta:
            materialize([model], self.device, self.seed, init_from)
        return model

    def rollout_model(self, part: str | None = None) -> Transformer:
        """The trained Transformer (or `part`) whole on this rank, to generate with, no collective
        inside: the module itself, or under FSDP a local copy of its gathered weights, refreshed by
        every call (collective), as RL frameworks sync weights into their inference engine."""
        module = self.submodel(part)
        if not self.parallel.sharded:
            return module
        state = gathered_model_state(module)
        if self._rollout_copy is None:
            self._rollout_copy = build_model(self.model_cfg, self.device, head=module.head)
        self._rollout_copy.load_state_dict(state)
        return self._rollout_copy

    def save_release(self, out_dir: Path, config: dict | None = None, tracker: Tracker | None = None,
                     part: str | None = None) -> None:
        """The whole model (or its submodule `part`) gathered from every rank into
        `out_dir`/model.safetensors and model_config.json, with `config` (the training config) as
        train_config.json; all three logged to `tracker`. Rank 0 writes; the optimizer state stays
        in checkpoints/ (3x the weights)."""
        state = self.full_model_state()
        if self.env.is_main:
            head = self.head
            if part is not None:
                state = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
                head = self.submodel(part).head
            write_release(state, self.model_cfg, out_dir, head)
            names = [WEIGHTS, RELEASE_CONFIG]
            if config is not None:
                io.write_json(Path(out_dir) / "train_config.json", config)
                names.append("train_config.json")
            for name in names:
                (tracker or NullTracker()).log_artifact(Path(out_dir) / name)
        env.barrier()

    # --- steps -----------------------------------------------------------------------------------

    def _forward_backward(self, task: TrainTask) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """All micro-batches of one optimizer step; their mean loss and metrics and their token
        slots (this rank's)."""
        p, accumulation = self.parallel, self.accumulation
        batches = [_to_device(task.train_loader.next_batch(), self.device) for _ in range(accumulation)]
        tokens = sum(batch_tokens(b) for b in batches)
        if p.schedule is not None:  # the schedule splits the step's batch into the same micro-batches
            with p.loss_context():
                return self._pipeline_losses(task, _concat(batches), train=True).mean().detach(), {}, tokens
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(batches):
            with p.gradient_sync(micro == accumulation - 1), p.loss_context():
                with autocast(self.device, self.autocast_dtype):
                    loss, metrics = task.step_fn(p.forward, batch)
                loss = loss / accumulation
                loss.backward()
            loss_sum += env.plain(loss.detach())
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + env.plain(v.detach()) / accumulation
        return loss_sum, metric_sums, tokens

    def _pipeline_losses(self, task: TrainTask, batch: Batch, train: bool) -> torch.Tensor:
        """Run a step's batch through the pipeline schedule; the loss of each micro-batch on the
        last stage, zeros elsewhere. Gradients come divided by the number of micro-batches."""
        p = self.parallel
        inputs, labels = task.split_batch(batch)
        losses: list[torch.Tensor] = []
        args = (inputs,) if p.has_first_stage else ()
        target = labels if p.has_last_stage else None
        (p.schedule.step if train else p.schedule.eval)(*args, target=target, losses=losses)
        return torch.stack(losses) if p.has_last_stage else torch.zeros(self.accumulation, device=self.device)

    def _reduce(self, loss: torch.Tensor, norm: torch.Tensor, metrics: dict[str, torch.Tensor],
                tokens: int) -> list[float]:
        """[global mean loss, grad norm, token slots of all data-parallel ranks, *metrics], the same
        numbers on every rank (one all-reduce)."""
        weight = self.parallel.loss_weight  # 1/dp on one rank of each data-parallel group, else 0
        values = [loss.float() * weight, norm.float() * (1.0 if self.env.is_main else 0.0),
                  torch.tensor(float(tokens * weight * self.dp_size), device=self.device),
                  *(v.float() * weight for v in metrics.values())]
        return env.all_reduce_sum(torch.stack(values)).tolist()

    @torch.no_grad()
    def evaluate(self, task: TrainTask) -> float | None:
        """Mean loss over the first `task.eval_steps` validation micro-batches (the same every time)."""
        if task.val_loader is None or task.eval_steps == 0:
            return None
        task.val_loader.rewind()
        parts = self.model_parts
        for part in parts:
            part.eval()
        total, p = 0.0, self.parallel
        batches = [_to_device(task.val_loader.next_batch(), self.device) for _ in range(task.eval_steps)]
        if p.schedule is not None:
            # a schedule call runs a step's worth of micro-batches: the last group is padded with
            # repeats of its last micro-batch, whose losses are dropped (each window counts once)
            group = self.accumulation
            padded = batches + batches[-1:] * (-len(batches) % group)
            for start in range(0, len(padded), group):
                losses = self._pipeline_losses(task, _concat(padded[start:start + group]), train=False)
                total += float(losses[:len(batches) - start].sum())
        else:
            for batch in batches:
                with p.loss_context(), autocast(self.device, self.autocast_dtype):
                    loss, _ = task.step_fn(p.forward, batch)
                total += float(env.plain(loss))
        for part in parts:
            part.train()
        mean = torch.tensor([total / task.eval_steps * p.loss_weight], dtype=torch.float64, device=self.device)
        return float(env.all_reduce_sum(mean)[0])

    def resume_and_fit(self, task: TrainTask, out_dir: Path, config: dict, tracker: Tracker | None = None,
                       stop_after: int | None = None) -> tuple[LoopState, dict]:
        """`resume` from `out_dir`/checkpoints and `fit` there: the final state and its `loop_summary`."""
        state = self.resume(Path(out_dir) / "checkpoints", task)
        resumed_from = state.step
        state = self.fit(task, state, ckpt_root=Path(out_dir) / "checkpoints", config=config, tracker=tracker,
                         stop_after=stop_after)
        return state, loop_summary(state, resumed_from, self)

    def fit(self, task: TrainTask, state: LoopState, *, ckpt_root: Path, config: dict, tracker: Tracker | None = None,
            stop_after: int | None = None, until: int | None = None) -> LoopState:
        """Run optimizer steps state.step .. cfg.max_steps-1 (or `until`-1: a continued run, its learning
        rate at the schedule's floor past max_steps) and return the final state.

        `config` is saved beside every checkpoint. `stop_after` ends the loop after that step as
        if the process were killed (tests of resume).
        """
        end = self.cfg.max_steps if until is None else until
        cfg, p, main = self.cfg, self.parallel, self.env.is_main
        tracker = tracker if main and tracker is not None else NullTracker()
        peak = peak_flops(self.device, self.dtype, cfg.peak_flops) * self.env.world_size
        last_good = checkpoint.newest(ckpt_root)  # named in the divergence message; resuming verified it
        start_step, saved_step = state.step, None
        for part in self.model_parts:
            part.train()

        def save(step: int) -> None:
            nonlocal last_good, saved_step
            saved_step = step
            payload = {**state.to_json(), "loader": task.train_loader.state_dict(),
                       "scheduler": {"step": step, "lr": lr_at(max(step - 1, 0), cfg)}}
            last_good = checkpoint.save(ckpt_root, step, self.model_parts, self.optimizers, payload, config,
                                        cfg.keep_checkpoints)

        def log_eval() -> None:
            state.val_loss = self.evaluate(task)
            if state.val_loss is not None:
                state.history.append((state.step, state.val_loss))
                tracker.log_metrics({"val/loss": state.val_loss}, step=state.step)

        window_tokens, window_time = 0, 0.0
        bar = progress(end, task.name, unit="step", initial=state.step, enabled=main)

        def say(line: str) -> None:  # rank 0 speaks for all (the numbers are all-reduced)
            if main:
                bar.write(line)

        while state.step < end:
            step = state.step
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for optimizer in self.optimizers:
                set_lr(optimizer, lr)
            loss_sum, metric_sums, tokens = self._forward_backward(task)
            norm = p.grad_norm()
            loss_value, grad_norm, step_tokens, *metric_values = self._reduce(loss_sum, norm, metric_sums, tokens)
            tokens_per_step = round(step_tokens)
            _guard(step, loss_value, grad_norm, state, cfg, last_good, task.name)
            if cfg.grad_clip > 0:
                p.clip_grads(cfg.grad_clip, norm)
            for optimizer in self.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0

            state.step = step + 1
            state.tokens += tokens_per_step
            state.train_time_s += dt
            if step == start_step:
                state.first_step_s = dt
            state.train_loss = loss_value
            state.loss_ema = loss_value if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss_value
            window_tokens, window_time = window_tokens + tokens_per_step, window_time + dt
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

            if state.step % cfg.log_every == 0 or state.step == end:
                state.train_history.append((state.step, loss_value))
                tps = window_tokens / window_time
                mfu = tps * task.flops_per_token / peak
                tracker.log_metrics({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                     "train/tokens_per_s": tps, "train/mfu": mfu,
                                     "train/peak_mem_mb": peak_memory_mb(self.device), "train/tokens": state.tokens,
                                     **{f"train/{k}": v for k, v in zip(metric_sums, metric_values)}},
                                    step=state.step)
                say(f"step {state.step:6d}/{end} loss {loss_value:.4f} lr {lr:.2e} "
                          f"gnorm {grad_norm:.3f} tok/s {tps:,.0f} mfu {mfu:.1%}")
                window_tokens, window_time = 0, 0.0
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < end:
                log_eval()
                if state.val_loss is not None:
                    say(f"step {state.step:6d} val loss {state.val_loss:.4f}")
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < end:
                save(state.step)
            for callback in self.on_step_end:
                callback(state)
            if stop_after is not None and state.step >= stop_after:
                bar.close()
                return state
        bar.close()

        if not state.history or state.history[-1][0] != state.step:
            log_eval()
        if state.step != start_step and saved_step != state.step:  # the final state, unless just saved or resumed
            save(state.step)
        return state


def _guard(step: int, loss: float, grad_norm: float, state: LoopState, cfg: TrainSection, last_good: Path | None,
           section: str = "pretrain") -> None:
    """Stop before the optimizer step when the loss or gradient is not finite, or the loss spikes.
    The numbers are all-reduced, so every rank stops at the same step."""
    keep = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"step {step + 1}: loss {loss} / grad norm {grad_norm} is not finite; "
                               f"stopped before the optimizer step; {keep}")
    if cfg.spike_factor and step >= cfg.spike_warmup and state.loss_ema is not None and loss > cfg.spike_factor * state.loss_ema:
        raise TrainingDiverged(f"step {step + 1}: loss {loss:.4f} is {loss / state.loss_ema:.1f}x its running mean "
                               f"{state.loss_ema:.4f} ({section}.spike_factor={cfg.spike_factor}); stopped before the "
                               f"optimizer step; {keep}. Lower {section}.lr or raise {section}.spike_factor (a changed "
                               f"config starts the stage over).")
