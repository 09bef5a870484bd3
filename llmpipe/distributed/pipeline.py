"""Pipeline parallelism: the model's blocks split into stages over the ranks of a `pp` group.

The whole model is built on every rank (same seed, same weights), then `split_stages` keeps on
each rank only what its stages need. Stage s of S = pp * v holds a consecutive run of blocks;
rank r runs stages r, r + pp, r + 2 pp, ... (v > 1 only with interleaved 1F1B). The first stage
keeps `tok_emb`, the last `norm_f` and `lm_head`; the model's forward then takes or returns
hidden states (B, T, C) on its own.

What is checkpointed and optimized is the rank's pruned model (`PipelinedModel.model`): one
module with this rank's parameters under their global names ("trf_blocks.5.attn.wq.weight"),
so DCP reshards between pipeline, FSDP, tensor-parallel and single-process layouts. The stage
modules that the schedule calls share those parameters.

Micro-batches: a step's batch is `accumulation` micro-batches of `micro_batch_size` sequences,
the same micro-batches one process accumulates; the schedule's loss is the mean of their mean
losses, and gradients are divided by their number, as one process divides each loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from llmpipe.config import ParallelConfig
from llmpipe.model.model import Transformer, next_token_loss

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stages_per_rank(cfg: ParallelConfig) -> int:
    return cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved_1f1b" else 1


def check_pipeline(cfg: ParallelConfig, n_layers: int, microbatches: int) -> None:
    """Enough blocks for every stage, enough micro-batches for the schedule (one-line errors)."""
    n_stages = cfg.pp * stages_per_rank(cfg)
    if n_layers < n_stages:
        raise ValueError(f"model.n_layers={n_layers} must be >= parallel.pp * stages per rank = {n_stages} "
                         f"with parallel.pp_schedule={cfg.pp_schedule} (one block or more per stage)")
    if cfg.pp_schedule == "1f1b" and microbatches < cfg.pp:
        raise ValueError(f"parallel.pp_schedule=1f1b needs gradient accumulation steps (batch_tokens / (micro_batch_size "
                         f"* seq_len)) = {microbatches} >= parallel.pp={cfg.pp} micro-batches per step")
    if cfg.pp_schedule == "interleaved_1f1b" and microbatches % cfg.pp:
        raise ValueError(f"parallel.pp_schedule=interleaved_1f1b needs gradient accumulation steps (batch_tokens / "
                         f"(micro_batch_size * seq_len)) = {microbatches} to be a multiple of parallel.pp={cfg.pp}")


def stage_layers(n_layers: int, n_stages: int) -> list[list[str]]:
    """Block keys of each stage: consecutive runs, the first `n_layers % n_stages` stages one longer."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [[str(i) for i in range(bounds[s], bounds[s + 1])] for s in range(n_stages)]


def _stage_view(model: Transformer, blocks: list[str], first: bool, last: bool) -> Transformer:
    """A Transformer sharing `model`'s modules, with only `blocks` and the ends it needs."""
    stage = Transformer.__new__(Transformer)
    nn.Module.__init__(stage)
    stage.cfg, stage.head_size = model.cfg, model.head_size
    stage.activation_checkpointing = model.activation_checkpointing
    stage.tok_emb = model.tok_emb if first else None
    stage.trf_blocks = nn.ModuleDict({key: model.trf_blocks[key] for key in blocks})
    stage.norm_f = model.norm_f if last else None
    stage.lm_head = model.lm_head if last else None
    stage.register_buffer("rope_cos", model.rope_cos, persistent=False)
    stage.register_buffer("rope_sin", model.rope_sin, persistent=False)
    return stage


def split_stages(model: Transformer, pp_rank: int, cfg: ParallelConfig) -> list[Transformer]:
    """Prune `model` in place to this rank's stages; return their modules in schedule order."""
    per_rank = stages_per_rank(cfg)
    n_stages = cfg.pp * per_rank
    layers = stage_layers(model.cfg.n_layers, n_stages)
    mine = [pp_rank + i * cfg.pp for i in range(per_rank)]
    kept = {key for s in mine for key in layers[s]}
    for key in [k for k in model.trf_blocks if k not in kept]:
        del model.trf_blocks[key]
    first, last = 0 in mine, n_stages - 1 in mine
    if not first:
        model.tok_emb = None
    if not last:
        model.norm_f, model.lm_head = None, None
    return [_stage_view(model, layers[s], s == 0, s == n_stages - 1) for s in mine]


class PipelinedModel:
    """This rank's part of a pipeline and the schedule that runs it.

    `train_step` and `eval_loss` take the step's whole batch on every rank (only the first stage
    reads the inputs, only the last the targets) and return the mean loss on every rank, so the
    trainer's logging and divergence guard agree everywhere.
    """

    def __init__(self, model: Transformer, cfg: ParallelConfig, pp_group: dist.ProcessGroup,
                 microbatches: int, device: torch.device):
        check_pipeline(cfg, model.cfg.n_layers, microbatches)
        self.pp_group, self.device = pp_group, device
        self.pp_size = dist.get_world_size(pp_group)
        pp_rank = dist.get_rank(pp_group)
        self.stage_modules = split_stages(model, pp_rank, cfg)
        self.model = model  # this rank's parameters under global names: optimizer and checkpoints
        n_stages = cfg.pp * stages_per_rank(cfg)
        self.stages = [PipelineStage(module, pp_rank + i * cfg.pp, n_stages, device, group=pp_group)
                       for i, module in enumerate(self.stage_modules)]
        self.has_last_stage = any(stage.is_last for stage in self.stages)
        schedule = SCHEDULES[cfg.pp_schedule]
        stages = self.stages if cfg.pp_schedule == "interleaved_1f1b" else self.stages[0]
        self.schedule = schedule(stages, n_microbatches=microbatches, loss_fn=next_token_loss)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the whole step's batch x, y (B, T); gradients are left in place."""
        losses: list[torch.Tensor] = []
        self.schedule.step(x, target=y, losses=losses)
        return self._mean_loss(losses)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        self.schedule.eval(x, target=y, losses=losses)
        return self._mean_loss(losses)

    def train(self, mode: bool = True) -> None:
        for module in self.stage_modules:
            module.train(mode)

    def _mean_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The mean micro-batch loss, computed on the last stage's rank and broadcast to the others."""
        loss = torch.stack([loss.detach() for loss in losses]).mean() if self.has_last_stage else torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.pp_group, group_src=self.pp_size - 1)
        return loss
