"""Model and optimizer state through torch.distributed.checkpoint (DCP): every rank writes the
shards it holds, keyed by the single-device model's parameter names, and any layout reads back
the pieces it needs. A folder saved by FSDP on 2 ranks loads into 1 process (no process group)
or into tensor parallel on 2.

The optimizer state is flattened (`state.<param>.exp_avg`, `param_groups.<param>.lr`): keys per
parameter, so the states of several model parts (pipeline stages) or of ZeRO-1's partitions are
disjoint pieces of one dictionary.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer

from llmpipe.distributed.env import is_distributed, is_main, local_rank_in, submesh

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """ZeRO-1 keeps this rank's partition in a plain optimizer: its state is this rank's piece."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None) -> dict:
    model: dict = {}
    for part in parts:
        model.update(get_model_state_dict(part))
    state = {"model": model}
    if optimizers is not None:
        optim: dict = {}
        for part, opt in zip(parts, optimizers, strict=True):
            optim.update(get_optimizer_state_dict(part, _local_optimizer(opt), options=FLAT))
        state["optimizer"] = optim
    return state


@contextlib.contextmanager
def _quiet_without_process_group():
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _ReproducibleWriter(dcp.FileSystemWriter):
    """DCP's file writer without its storage record: the folder's path and a random save id would
    otherwise go into `.metadata`, and the same training would save different bytes each time.
    Loading never reads that record."""

    def storage_meta(self):
        return None


def save_sharded(folder: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder` (collective)."""
    with _quiet_without_process_group():
        dcp.save(_state(parts, optimizers), storage_writer=_ReproducibleWriter(str(folder)),
                 no_dist=not is_distributed())


def load_sharded(folder: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None) -> None:
    """Fill `parts` (and `optimizers`) from `folder`, whatever layout wrote it (collective)."""
    state = _state(parts, optimizers)
    with _quiet_without_process_group():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not is_distributed())
    for part in parts:
        set_model_state_dict(part, state["model"])
    if optimizers is not None:
        for part, opt in zip(parts, optimizers, strict=True):
            set_optimizer_state_dict(part, _local_optimizer(opt), state["optimizer"], options=FLAT)


def full_model_state(parts: list[nn.Module], mesh: DeviceMesh | None = None) -> dict[str, torch.Tensor]:
    """The whole model's tensors gathered on CPU on global rank 0 (empty elsewhere; collective)."""
    if submesh(mesh, "pp") is None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 keeps the tensors
        return {k: v for part in parts for k, v in get_model_state_dict(part, options=options).items()}
    # pipeline stages live on other ranks: each stage's first rank sends its gathered layers to rank 0
    options = StateDictOptions(full_state_dict=True)
    state = {k: v.cpu() for part in parts for k, v in get_model_state_dict(part, options=options).items()}
    sends = local_rank_in(mesh, "dp") == 0 and local_rank_in(mesh, "tp") == 0
    stages = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(state if sends else {}, stages, dst=0)
    return {k: v for stage in stages for k, v in stage.items()} if is_main() else {}


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole of `model` (FSDP shards all-gathered) on every rank, on its device (collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def load_full_model_state(parts: list[nn.Module], state: dict[str, torch.Tensor], missing_ok: tuple[str, ...] = ()) -> None:
    """Load a whole single-device state dict (e.g. an upstream stage's release weights) into
    `parts`, each keeping the pieces it holds (a pipeline stage ignores other stages' layers).
    Tensors named in `missing_ok` may be absent from `state`: they keep their values."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    for part in parts:
        missing = set(set_model_state_dict(part, state, options=options).missing_keys) - set(missing_ok)
        if missing:
            raise KeyError(f"weights without {', '.join(sorted(missing)[:5])} ({len(missing)} tensors missing)")
