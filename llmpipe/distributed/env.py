"""Process groups, the device mesh and the few collectives the trainer needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed` reads them and joins the
default process group (nccl on GPU, gloo on CPU). Without them, or with WORLD_SIZE=1, no group
is created and every collective below is the identity, so one process runs the same code.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from llmpipe.config import ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its global rank and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistEnv:
    """Join torchrun's process group (once per process) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", device_id=device
                                if device_type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on global rank 0, which writes a stage's files and logs."""
    return rank() == 0


def destroy() -> None:
    """Leave the process group, once every rank is done with its collectives.

    Collect garbage first: a wrapped model that only a reference cycle keeps alive (an exception's
    traceback holds the trainer's frames) still holds the group and gloo work objects; freed at
    interpreter exit instead, their threads abort the process (SIGABRT, "terminate called without
    an active exception") after it has finished its work.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Layout:
    """Degrees of each parallel dimension; their product is the world size."""

    dp: int = 1  # data-parallel replicas or FSDP shards: each sees its own slice of the global batch
    tp: int = 1  # tensor-parallel ranks: the same batch, a slice of every matrix
    pp: int = 1  # pipeline stages: the same batch, a slice of the layers

    @classmethod
    def of(cls, parallel: ParallelConfig, world_size: int) -> "Layout":
        if world_size == 1:
            return cls()
        if parallel.strategy in ("ddp", "zero1", "zero2", "fsdp"):
            return cls(dp=world_size)
        if parallel.strategy == "tp":
            return cls(tp=world_size)
        if parallel.strategy == "pp":
            return cls(pp=world_size)
        return cls(dp=world_size // parallel.tp, tp=parallel.tp)  # fsdp_tp


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh | None:
    """A mesh with a named dimension per degree above 1 ("pp", "dp", "tp", outermost first), or
    None on one process. tp is innermost: its collectives run every layer, so its ranks are
    neighbours (one node) when the world spans nodes."""
    dims = [(name, size) for name, size in (("pp", layout.pp), ("dp", layout.dp), ("tp", layout.tp)) if size > 1]
    if not dims:
        return None
    return init_device_mesh(device_type, tuple(s for _, s in dims), mesh_dim_names=tuple(n for n, _ in dims))


def submesh(mesh: DeviceMesh | None, name: str) -> DeviceMesh | None:
    """The 1-D mesh of dimension `name`, or None when the mesh has no such dimension."""
    if mesh is None or name not in (mesh.mesh_dim_names or ()):
        return None
    return mesh[name]


def local_rank_in(mesh: DeviceMesh | None, name: str) -> int:
    sub = submesh(mesh, name)
    return 0 if sub is None else sub.get_local_rank()


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (a loss under loss parallel, a replicated metric) gathered whole."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over every rank of the world, in place (identity on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (e.g. a path or a decision made by rank 0)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` on one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
