"""Pipeline parallelism: the model's blocks split into stages over the ranks of a `pp` group.

The whole model is built on every rank (same seed, same weights, or on the meta device), then
`prune_to_rank` keeps on each rank only what its stages need. Stage s of S = pp * v holds a
consecutive run of blocks; rank r runs stages r, r + pp, r + 2 pp, ... (v > 1 only with
interleaved 1F1B). The first stage keeps `tok_emb`, the last `norm_f` and `lm_head` (or `score`); the model's
forward then takes or returns hidden states (B, T, C) on its own.

What is checkpointed and optimized is the rank's pruned model: one module with this rank's
parameters under their global names ("trf_blocks.5.attn.wq.weight"), so DCP reshards between
pipeline, FSDP, tensor-parallel and single-process layouts. The stage modules that the schedule
calls (`build_schedule`) are views sharing those parameters.

Micro-batches: a step's batch is the trainer's `accumulation` micro-batches of `micro_batch_size`
sequences, the same micro-batches one process accumulates, run by one schedule step; its loss is
the mean of their mean losses, and gradients are divided by their number, as one process divides
each loss.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from llmpipe.config import ParallelConfig
from llmpipe.errors import BadValue
from llmpipe.model.model import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stages_per_rank(cfg: ParallelConfig) -> int:
    return cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved_1f1b" else 1


def check_pipeline(cfg: ParallelConfig, n_layers: int, microbatches: int) -> None:
    """Enough blocks for every stage, enough micro-batches for the schedule (one-line errors)."""
    n_stages = cfg.pp * stages_per_rank(cfg)
    if n_layers < n_stages:
        raise BadValue(f"model.n_layers={n_layers} must be >= parallel.pp * stages per rank = {n_stages} "
                         f"with parallel.pp_schedule={cfg.pp_schedule} (one block or more per stage)")
    if cfg.pp_schedule == "1f1b" and microbatches < cfg.pp:
        raise BadValue(f"parallel.pp_schedule=1f1b needs gradient accumulation steps (batch_tokens / (micro_batch_size "
                         f"* seq_len)) = {microbatches} >= parallel.pp={cfg.pp} micro-batches per step")
    if cfg.pp_schedule == "interleaved_1f1b" and microbatches % cfg.pp:
        raise BadValue(f"parallel.pp_schedule=interleaved_1f1b needs gradient accumulation steps (batch_tokens / "
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
    stage.cfg, stage.head_size, stage.head = model.cfg, model.head_size, model.head
    stage.tok_emb = model.tok_emb if first else None
    stage.trf_blocks = nn.ModuleDict({key: model.trf_blocks[key] for key in blocks})
    stage.norm_f = model.norm_f if last else None
    stage.lm_head = model.lm_head if last else None
    stage.score = model.score if last else None
    stage.register_buffer("rope_cos", model.rope_cos, persistent=False)
    stage.register_buffer("rope_sin", model.rope_sin, persistent=False)
    return stage


def prune_to_rank(model: Transformer, pp_rank: int, cfg: ParallelConfig) -> None:
    """Delete from `model`, in place, every block and end that none of this rank's stages runs."""
    n_stages = cfg.pp * stages_per_rank(cfg)
    layers = stage_layers(model.cfg.n_layers, n_stages)
    mine = rank_stages(pp_rank, cfg)
    kept = {key for s in mine for key in layers[s]}
    for key in [k for k in model.trf_blocks if k not in kept]:
        del model.trf_blocks[key]
    if 0 not in mine:
        model.tok_emb = None
    if n_stages - 1 not in mine:
        model.norm_f, model.lm_head, model.score = None, None, None


def rank_stages(pp_rank: int, cfg: ParallelConfig) -> list[int]:
    """Stage indices run by `pp_rank`: r, r + pp, ... (the loop order interleaved 1F1B expects)."""
    return [pp_rank + i * cfg.pp for i in range(stages_per_rank(cfg))]


def build_schedule(model: Transformer, cfg: ParallelConfig, pp_group: dist.ProcessGroup, microbatches: int,
                   device: torch.device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """The schedule running this rank's stages of `model` (checked by `check_pipeline`, pruned by
    `prune_to_rank`, then parallelized: stages are views of its modules as they are now, wrappers
    included).

    `schedule.step(x, target=y, losses=losses)` takes the step's whole batch x, y (B, T) on every
    rank, splits it into `microbatches`, and appends each micro-batch's `loss_fn(logits, y)` to
    `losses` on the last stage's rank; gradients are divided by `microbatches`.
    """
    pp_rank = dist.get_rank(pp_group)
    n_stages = cfg.pp * stages_per_rank(cfg)
    layers = stage_layers(model.cfg.n_layers, n_stages)
    stages = [PipelineStage(_stage_view(model, layers[s], s == 0, s == n_stages - 1), s, n_stages, device,
                            group=pp_group) for s in rank_stages(pp_rank, cfg)]
    schedule_class = SCHEDULES[cfg.pp_schedule]
    runs = stages if issubclass(schedule_class, PipelineScheduleMulti) else stages[0]
    return schedule_class(runs, n_microbatches=microbatches, loss_fn=loss_fn)
