"""`parallelize(model, mesh, cfg)`: the one place a single-device model becomes a parallel one.

The contract with the trainer (llmpipe/training/trainer.py) is `ParallelModel`:

- `model_parts`: the modules this rank trains and checkpoints: one, the model (under pp, pruned
  to this rank's stages). The model is a Transformer, or a module of Transformers trained
  together (PPO's policy and critic): each of them is parallelized as one model would be. Parameter names are the single-device model's names, so checkpoints
  (DCP) reshard between strategies.
- `forward`: what a stage's `step_fn(forward, batch)` calls (a DDP wrapper or the model itself);
  None under pp, where the trainer calls `schedule.step(inputs, target=labels, losses=...)` once
  per optimizer step with the step's whole batch (its micro-batches concatenated).
- `gradient_sync(enabled)`: a context for one micro-batch's backward; gradients are only
  reduced across data-parallel ranks on the micro-batch where it is enabled (the last), or on
  every one with `parallel.grad_sync: micro_batch` (sharded strategies).
- `loss_context()`: wraps forward + backward (loss parallel under tp).
- `grad_norm()` / `clip_grads(max_norm, norm)`: the global norm over every rank's gradients
  (DTensor shards, pipeline stages), the same number on every rank.
- `loss_weight`: this rank's share of the global mean loss (1/dp on the ranks that hold the
  loss: tp rank 0 of the last pipeline stage, 0 elsewhere), for one all-reduce SUM.

Order of application (torchtitan's): tensor parallel (+ sequence parallel, loss parallel),
activation checkpointing, torch.compile, then FSDP2 `fully_shard` (zero2: parameters kept
gathered between forward and backward; fsdp: resharded, ZeRO-3) or DDP (ddp, and zero1 whose
optimizer is a ZeroRedundancyOptimizer). Pipeline parallel first prunes the model to this rank's
stages (llmpipe/distributed/pipeline.py), applies the rest to what is left, and finally builds
the schedule over views of those modules.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from llmpipe.config import SHARDED_STRATEGIES, TrainSection
from llmpipe.distributed.env import Layout, local_rank_in, submesh
from llmpipe.distributed.tensor_parallel import apply_tp, loss_context
from llmpipe.model.model import Transformer


def transformers_of(model: nn.Module) -> list[Transformer]:
    """The model itself, or the Transformers a composite model holds (PPO's policy and critic)."""
    return [model] if isinstance(model, Transformer) else [m for m in model.children() if isinstance(m, Transformer)]


def _fsdp_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def _fully_shard(models: list[Transformer], dp_mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                 reshard: bool = True) -> None:
    """FSDP2 on each block, then on each Transformer (its embeddings, norm and head): every
    Transformer is a root of its own, so each can be called alone (a rollout, a frozen model)."""
    for model in models:
        for block in model.trf_blocks.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)


@dataclass
class ParallelModel:
    model_parts: list[nn.Module]
    forward: nn.Module | None
    layout: Layout = field(default_factory=Layout)
    mesh: DeviceMesh | None = None
    strategy: str = "ddp"
    # pp: builds the torch.distributed.pipelining schedule on first use of `schedule`, after the
    # trainer has materialized meta-device weights (the stages are views of the modules as they are then)
    schedule_factory: Callable[[], Any] | None = None
    has_first_stage: bool = True  # pp: this rank feeds the inputs
    has_last_stage: bool = True  # pp: this rank computes the loss
    loss_parallel: bool = False  # tp: the loss is computed on vocabulary-sharded logits
    mixed_precision: bool = False  # FSDP casts parameters to bf16 itself: no autocast around forward
    sync_every_micro_batch: bool = False  # FSDP reduce-scatters after every backward: shards only
    fsdp_roots: list[nn.Module] = field(default_factory=list)  # the fully_shard-ed Transformers

    @property
    def sharded(self) -> bool:
        """The parameters are FSDP shards: a rank holds no whole weight between forwards."""
        return bool(self.fsdp_roots)

    @functools.cached_property
    def schedule(self) -> Any | None:
        return self.schedule_factory() if self.schedule_factory is not None else None

    @property
    def dp_rank(self) -> int:
        return local_rank_in(self.mesh, "dp")

    @property
    def loss_weight(self) -> float:
        owner = self.has_last_stage and local_rank_in(self.mesh, "tp") == 0
        return 1.0 / self.layout.dp if owner else 0.0

    def parameters(self) -> Iterator[nn.Parameter]:
        for part in self.model_parts:
            yield from part.parameters()

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or self.sync_every_micro_batch:
            return contextlib.nullcontext()
        if isinstance(self.forward, DistributedDataParallel):
            return self.forward.no_sync()
        return _fsdp_no_sync(self.fsdp_roots) if self.fsdp_roots else contextlib.nullcontext()

    def loss_context(self) -> contextlib.AbstractContextManager:
        return loss_context(self.loss_parallel)

    def build_optimizer(self, param_groups: list[dict], optimizer_class: type[torch.optim.Optimizer],
                        **defaults) -> torch.optim.Optimizer:
        """The optimizer over `param_groups`; zero1 shards its states over the data-parallel ranks."""
        if self.strategy == "zero1" and self.layout.dp > 1:
            return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class,
                                           process_group=submesh(self.mesh, "dp").get_group(), **defaults)
        return optimizer_class(param_groups, **defaults)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """L2 norm of all gradients of the whole model, a plain scalar tensor, equal on every rank."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # partial norms of the shards: reduce them
            norm = norm.full_tensor()
        pp = submesh(self.mesh, "pp")
        if pp is not None:  # each stage holds other layers: sum the squares over the stages
            squared = norm.pow(2)
            torch.distributed.all_reduce(squared, group=pp.get_group())
            norm = squared.sqrt()
        return norm

    @torch.no_grad()
    def clip_grads(self, max_norm: float, norm: torch.Tensor) -> None:
        torch.nn.utils.clip_grads_with_norm_(list(self.parameters()), max_norm, norm)


@contextlib.contextmanager
def _fsdp_no_sync(parts: list[FSDPModule]):
    """FSDP2's no_sync: gradients accumulate unsharded and unreduced until sync is enabled again."""
    for part in parts:
        part.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for part in parts:
            part.set_requires_gradient_sync(True)


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg: TrainSection, *, device: torch.device,
                param_dtype: torch.dtype | None = None,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                pp_microbatches: int = 1) -> ParallelModel:
    """Apply cfg.parallel's strategy over `mesh` (None: one process), activation checkpointing and
    compile to `model` (a Transformer, on `device` or the meta device); return the ParallelModel.

    `param_dtype`: bf16 under FSDP mixed precision (gradients still reduced in fp32).
    `loss_fn(pred, labels)`: the loss a pipeline's last stage computes; `pp_microbatches`: the
    micro-batches a pipeline schedule splits each step's batch into (pp only).
    """
    strategy = cfg.parallel.strategy
    layout = Layout.of(cfg.parallel, mesh.size() if mesh is not None else 1)
    models = transformers_of(model)
    pp_mesh, tp_mesh = submesh(mesh, "pp"), submesh(mesh, "tp")
    if model is not models[0] and (pp_mesh is not None or tp_mesh is not None):
        raise ValueError("a model of several Transformers runs under ddp, zero1, zero2 or fsdp, not tp or pp")
    if pp_mesh is not None:  # this rank keeps its stages' blocks, under their global names
        # imported here: torch.distributed.pipelining loads torch's compiler, ~1 s of every worker's start
        from llmpipe.distributed.pipeline import build_schedule, check_pipeline, prune_to_rank

        check_pipeline(cfg.parallel, model.cfg.n_layers, pp_microbatches)  # before any work, not at the first step
        prune_to_rank(model, pp_mesh.get_local_rank(), cfg.parallel)
    if tp_mesh is not None:  # + sequence parallel, + loss parallel: the logits stay vocabulary-sharded
        apply_tp(model, tp_mesh)
    for each in models:
        if cfg.activation_checkpointing:
            _checkpoint_blocks(each)
        if cfg.compile:  # in place: parameter names stay the model's
            if mesh is None:  # one process: the whole model, so inductor fuses across blocks and into the loss
                each.compile()  # (tiny on CPU: 1.25x the tokens/s of compiling each block)
            else:  # each block, as torchtitan does: FSDP's and DDP's hooks and pipeline stages sit between blocks
                for block in each.trf_blocks.values():
                    block.compile()
    dp_mesh = submesh(mesh, "dp")
    forward: nn.Module | None = model
    mixed_precision = False
    fsdp_roots: list[nn.Module] = []
    if dp_mesh is not None and strategy in SHARDED_STRATEGIES:
        mixed_precision = param_dtype is not None
        _fully_shard(models, dp_mesh, _fsdp_policy(param_dtype), reshard=strategy != "zero2")
        fsdp_roots = list(models)
    elif dp_mesh is not None:  # ddp, zero1
        device_ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(model, device_ids=device_ids, process_group=dp_mesh.get_group())
    schedule_factory = None
    if pp_mesh is not None:
        def schedule_factory():
            return build_schedule(model, cfg.parallel, pp_mesh.get_group(), pp_microbatches, device, loss_fn)

        forward = None
    first, last = models[0], models[-1]
    return ParallelModel(model_parts=[model], forward=forward, layout=layout, mesh=mesh, strategy=strategy,
                         schedule_factory=schedule_factory, has_first_stage=first.tok_emb is not None,
                         has_last_stage=last.norm_f is not None, loss_parallel=tp_mesh is not None,
                         mixed_precision=mixed_precision,
                         sync_every_micro_batch=dp_mesh is not None and cfg.parallel.grad_sync == "micro_batch",
                         fsdp_roots=fsdp_roots)


def parallelize_frozen(model: Transformer, mesh: DeviceMesh | None, cfg: TrainSection, *,
                       param_dtype: torch.dtype | None = None) -> Transformer:
    """A model that is only run forward (PPO's reference and reward model) in the trained model's
    layout: FSDP shards under the sharded strategies (its forwards are then collective: every
    rank calls it equally often), replicated otherwise. No gradients, eval mode."""
    model.requires_grad_(False)
    dp_mesh = submesh(mesh, "dp")
    if dp_mesh is not None and cfg.parallel.strategy in SHARDED_STRATEGIES:
        _fully_shard([model], dp_mesh, _fsdp_policy(param_dtype))
    return model.eval()


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block in backward; the wrapper's state-dict hooks keep the names."""
    for name, block in list(model.trf_blocks.items()):
        model.trf_blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
