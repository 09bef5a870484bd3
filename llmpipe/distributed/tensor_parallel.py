"""Tensor parallelism (Megatron-style) with sequence parallelism and a vocabulary-parallel loss.

The plan follows torchtitan's Llama plan, adapted to our module names:

- `tok_emb` is sharded by vocabulary rows; its partial sums are reduce-scattered over the sequence,
  so the residual stream between blocks is (B, T/tp, C) on each rank (sequence parallel).
- `attn_norm`, `mlp_norm` and `norm_f` run on the sequence shard (their weights are replicated).
- Attention and feed-forward inputs are all-gathered back to the full sequence once per module;
  `wq`/`wk`/`wv` and `w_gate`/`w_up` are split by output features (heads, hidden units), `wo` and
  `w_down` by input features, and their partial sums are reduce-scattered over the sequence.
- `lm_head` is split by vocabulary and its logits stay a DTensor sharded on the last dimension:
  the model's cross-entropy then runs vocabulary-parallel inside `loss_parallel()` without ever
  gathering (B, T, V).

A rank holds nh/tp query and nkv/tp key/value heads; the model's attention reads head counts
from the tensors, so it needs nothing from us.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from llmpipe.config import ModelSection
from llmpipe.config.training import tp_uneven
from llmpipe.errors import BadValue


def check_tp_degree(cfg: ModelSection, tp: int) -> None:
    """Heads, key/value heads, the feed-forward width and the vocabulary must split evenly over tp
    ranks; the sequence too, for sequence parallelism."""
    uneven = tp_uneven(cfg, tp)
    if uneven:
        raise BadValue(f"{', '.join(uneven)} must be divisible by parallel.tp={tp}")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a Transformer, or a pipeline stage of one) in place over the 1-D `tp_mesh`."""
    check_tp_degree(model.cfg, tp_mesh.size())
    top = {}
    if model.tok_emb is not None:
        top["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm_f is not None:
        top["norm_f"] = SequenceParallel()
        top["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    for block in model.trf_blocks.values():
        parallelize_module(block, tp_mesh, {
            "attn_norm": SequenceParallel(),
            # attn(x, cos, sin, cache, mask): only x is distributed; gathered once for wq, wk and wv
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None, None)),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.w_gate": ColwiseParallel(),
            "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=Shard(1)),
        })


def loss_context(enabled: bool):
    """Where a tensor-parallel model's forward and backward run: its cross-entropy on vocabulary-sharded
    logits is only defined inside `loss_parallel()`. A no-op for every other strategy."""
    return loss_parallel() if enabled else contextlib.nullcontext()
