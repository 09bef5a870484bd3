"""The memory planner against what autograd saves, against measured peaks, and on the presets."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from llmpipe.config import ModelSection, load
from llmpipe.distributed.plan import (
    GIB,
    USABLE_FRACTION,
    Cluster,
    Layout,
    _block_activation_bytes,
    _block_input_bytes,
    _head_activation_bytes,
    format_plan,
    make_plan,
    memory_per_gpu,
    step_time_s,
)
from llmpipe.model.model import Transformer, parameter_count

REPO = Path(__file__).resolve().parents[1]
# B * T differs from every weight dimension, so 2-D saved tensors tell activations from weight casts
SMALL = dict(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, d_ff=80, seq_len=24)
BATCH = 2


class Checkpointed(nn.Module):
    """A block recomputed in backward, as parallelize() applies activation checkpointing."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False, preserve_rng_state=False)


def checkpoint_blocks(model: nn.Module) -> None:
    blocks = model.trf_blocks
    for key in list(blocks.keys()) if isinstance(blocks, nn.ModuleDict) else range(len(blocks)):
        blocks[key] = Checkpointed(blocks[key])


def _saved_bytes(cfg: ModelSection, mode: str, checkpointing: bool = False) -> tuple[int, int]:
    """(activation bytes, bf16 weight-copy bytes) of the unique storages autograd saves in one forward.

    mode: "fp32", "autocast" (bf16 autocast over fp32 weights) or "bf16" (bf16 weights, as FSDP's
    mixed precision computes).
    """
    torch.manual_seed(0)
    model = Transformer(cfg)
    if mode == "bf16":
        model.to(torch.bfloat16)
    if checkpointing:
        checkpoint_blocks(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            weight_cast = t.dtype == torch.bfloat16 and t.dim() == 2 and BATCH * cfg.seq_len not in t.shape
            saved[storage.data_ptr()] = (storage.nbytes(), weight_cast)
        return t

    idx = torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            model(idx, idx)
    activations = sum(n for n, cast in saved.values() if not cast)
    return activations, sum(n for n, cast in saved.values() if cast)


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_activation_formula_counts_what_autograd_saves(mode):
    tokens = BATCH * SMALL["seq_len"]
    one, two = (ModelSection(**SMALL, n_layers=n, tie_embeddings=False) for n in (1, 2))
    split, whole = _block_activation_bytes(one, mode)
    (act1, cast1), (act2, cast2) = _saved_bytes(one, mode), _saved_bytes(two, mode)
    assert act2 - act1 == tokens * (split + whole)  # exactly one block's saved tensors
    C, F, kv_width = SMALL["d_model"], SMALL["d_ff"], SMALL["n_kv_heads"] * SMALL["d_model"] // SMALL["n_heads"]
    matmul_weights = 2 * C * C + 2 * C * kv_width + 3 * C * F  # wq, wo; wk, wv; SwiGLU
    # autocast saves a bf16 copy of each matmul weight: the planner counts it with the weights
    assert cast2 - cast1 == (2 * matmul_weights if mode == "autocast" else 0)
    head_saved, _, _, _ = _head_activation_bytes(one, mode, tp=1)
    # the rest: token ids, the rotary tables and the loss, a few hundred bytes
    assert 0 <= act1 - tokens * (split + whole + head_saved) < 0.02 * act1


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
def test_tied_head_formula_counts_what_the_chunked_loss_saves(mode):
    tokens = BATCH * SMALL["seq_len"]
    one = ModelSection(**SMALL, n_layers=1, tie_embeddings=True)
    split, whole = _block_activation_bytes(one, mode)
    head_saved, _, head_fixed, _ = _head_activation_bytes(one, mode, tp=1)
    act1, _ = _saved_bytes(one, mode)
    assert 0 <= act1 - (tokens * (split + whole + head_saved) + head_fixed) < 0.02 * act1


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_checkpointing_saves_only_block_inputs(mode):
    tokens = BATCH * SMALL["seq_len"]
    one, two = (ModelSection(**SMALL, n_layers=n) for n in (1, 2))
    per_block = _saved_bytes(two, mode, checkpointing=True)[0] - _saved_bytes(one, mode, checkpointing=True)[0]
    assert per_block == tokens * _block_input_bytes(one, mode)  # the residual stream entering the block


MEASURE_PEAK = r"""
import sys
import torch
from llmpipe.config import ModelSection, PretrainSection
from llmpipe.model.model import Transformer
from llmpipe.training.optim import build_optimizer
from test_plan import checkpoint_blocks

def status(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

def train_steps(model, optimizer, x, y, steps, accumulation=1):
    for _ in range(steps):
        for _ in range(accumulation):
            (model(x, y) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

model_cfg = ModelSection.model_validate_json(sys.argv[1])
train_cfg = PretrainSection.model_validate_json(sys.argv[2])
g = torch.Generator().manual_seed(0)
x, y = (torch.randint(0, model_cfg.vocab_size, (train_cfg.micro_batch_size, model_cfg.seq_len), generator=g) for _ in "xy")
# one-off costs of the process, not of the model: thread pools, and libtorch's code paged in by
# the first use of each kernel; a small model of the same layout pays them before the baseline
small_cfg = model_cfg.model_copy(update={"vocab_size": 300, "d_model": 32, "n_heads": 2, "n_kv_heads": None,
                                         "d_ff": 32, "n_layers": 1})
small = Transformer(small_cfg)
if train_cfg.activation_checkpointing:
    checkpoint_blocks(small)
train_steps(small, build_optimizer(small, train_cfg), x[:1] % 300, y[:1] % 300, steps=2)
del small
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from the current RSS
baseline = status("VmRSS")
model = Transformer(model_cfg)
if train_cfg.activation_checkpointing:
    checkpoint_blocks(model)
accumulation = train_cfg.batch_tokens // (train_cfg.micro_batch_size * model_cfg.seq_len)
train_steps(model, build_optimizer(model, train_cfg), x, y, steps=2, accumulation=accumulation)  # step 2 has AdamW's states
print(status("VmHWM") - baseline)
"""

# 25.6M parameters; 2 micro-batches per step, so gradients are held while the second one runs
TINY_25M = ["model.d_model=512", "model.d_ff=1536", "pretrain.micro_batch_size=2", "pretrain.batch_tokens=1024"]


@pytest.mark.slow  # ~8 s each alone, ~25 s on the shared 2 cores
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize("overrides", [[], ["pretrain.activation_checkpointing=true"], TINY_25M],
                         ids=["tiny", "tiny-checkpointing", "25M"])
def test_cpu_estimate_within_25_percent_of_measured_peak(overrides):
    config = load(REPO / "configs/tiny.yaml", ["pretrain.device=cpu", *overrides])
    layout = Layout("ddp", activation_checkpointing=config.pretrain.activation_checkpointing)
    estimate = memory_per_gpu(config.model, config.pretrain, layout, world=1).total
    # glibc otherwise keeps freed buffers of up to 32 MB in its heap after the first one is freed
    # (a sliding mmap threshold), so the RSS would show its retention policy, not the tensors
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, config.model.model_dump_json(),
                             config.pretrain.model_dump_json()], capture_output=True, text=True, env=env, check=True)
    measured = int(result.stdout)
    assert abs(estimate - measured) <= 0.25 * measured, f"estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"


@pytest.mark.parametrize("preset", ["llama-1b", "llama-7b", "llama-13b"])
def test_presets_carry_a_plan_that_fits_on_8_x_80_gib_per_node(preset):
    config = load(REPO / f"configs/{preset}.yaml")
    assert config.pretrain.nproc == 8 and config.pretrain.nnodes == (2 if preset == "llama-13b" else 1)
    cluster = Cluster(gpus_per_node=8, gpu_mem_gib=80, nodes=config.pretrain.nnodes)
    configured = [p for p in make_plan(config, cluster) if p.configured]
    assert len(configured) == 1 and configured[0].fits
    assert configured[0].memory.total <= USABLE_FRACTION * 80 * GIB


def test_7b_on_one_node_fits_with_sharding_and_not_with_ddp():
    config = load(REPO / "configs/llama-7b.yaml")
    plans = make_plan(config, Cluster(gpus_per_node=8, gpu_mem_gib=80))
    assert plans[0].fits and plans[0].layout.strategy in ("zero2", "fsdp", "fsdp_tp", "pp")
    ddp = [p for p in plans if p.layout.strategy == "ddp"]
    assert len(ddp) == 2 and not any(p.fits for p in ddp)  # with and without activation checkpointing
    assert any(p.fits for p in plans if p.layout.strategy == "fsdp")
    order = [(not p.fits, p.step_time_s) for p in plans]
    assert order == sorted(order)  # fitting plans first, fastest first


def test_sharding_divides_what_each_strategy_shards():
    config = load(REPO / "configs/llama-7b.yaml")
    model, train = config.model, config.pretrain
    psi = parameter_count(model)
    ddp, zero1, zero2, fsdp = (memory_per_gpu(model, train, Layout(s), world=8) for s in ("ddp", "zero1", "zero2", "fsdp"))
    assert zero1.optimizer == pytest.approx(ddp.optimizer / 8) == pytest.approx(8 * psi / 8)
    assert zero1.grads == ddp.grads == 2 * 4 * psi  # fp32 gradients + DDP's buckets
    assert zero2.optimizer == zero1.optimizer
    assert zero2.grads == pytest.approx(4 * psi + 4 * psi / 8)  # unsharded while accumulating + the shard
    single = train.model_copy(update={"batch_tokens": train.micro_batch_size * model.seq_len * 8})
    assert memory_per_gpu(model, single, Layout("zero2"), world=8).grads < ddp.grads / 4  # no accumulation
    assert fsdp.weights < zero2.weights < ddp.weights
    assert fsdp.activations < ddp.activations  # FSDP's bf16 parameters: no fp32 residual, no autocast casts
    tp = memory_per_gpu(model, train, Layout("tp", tp=8), world=8)
    assert ddp.activations / 8 < tp.activations < ddp.activations / 2  # the linears' gathered inputs stay whole
    gpipe, one_f_one_b = (memory_per_gpu(model, train, Layout("pp", pp=8, pp_schedule=s), world=8)
                          for s in ("gpipe", "1f1b"))
    assert one_f_one_b.activations < gpipe.activations
    checkpointed = memory_per_gpu(model, train, Layout("fsdp", activation_checkpointing=True), world=8)
    assert checkpointed.activations < fsdp.activations / 4


def test_reducing_every_micro_batch_holds_only_the_gradient_shards():
    """With accumulation, FSDP keeps whole fp32 gradients until the step's last reduce-scatter; with
    grad_sync=micro_batch only the shards (and two blocks in flight), for d times the gradient traffic."""
    config = load(REPO / "configs/llama-7b.yaml")
    model, train = config.model, config.pretrain
    psi = parameter_count(model)
    once, every = (Layout("fsdp", grad_sync=sync) for sync in ("step", "micro_batch"))
    held_once, held_every = (memory_per_gpu(model, train, layout, world=8).grads for layout in (once, every))
    assert held_once == pytest.approx(4 * psi + 4 * psi / 8)
    assert 4 * psi / 8 < held_every < held_once / 4
    # an 80 GB node with its NVLink as the only link: 7B's compute still hides the extra traffic
    cluster = Cluster(gpus_per_node=8, gpu_mem_gib=80)
    assert step_time_s(model, train, every, cluster) == pytest.approx(step_time_s(model, train, once, cluster))
    slow_link = Cluster(gpus_per_node=1, gpu_mem_gib=80, nodes=8)  # every collective on the network
    assert step_time_s(model, train, every, slow_link) > step_time_s(model, train, once, slow_link)
    labels = {p.layout.label() for p in make_plan(config, cluster)}
    assert {"fsdp grad_sync=micro_batch", "zero2 grad_sync=micro_batch", "fsdp_tp tp=2 grad_sync=micro_batch"} <= labels
    assert not any("ddp grad_sync" in label or "zero1 grad_sync" in label for label in labels)


def test_plan_command_prints_the_table(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmpipe.cli", "plan", "--config", "configs/llama-7b.yaml",
                             "--gpus", "8", "--gpu-mem", "80"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = {f"{m[1]} {m[2]}": line for line in result.stdout.splitlines()
            if (m := re.match(r"^[ *] (\S.*?)\s+(on|off)\s", line))}
    configured = rows["fsdp grad_sync=micro_batch off"]
    assert configured.startswith("*") and " yes " in configured
    assert " no " in rows["ddp off"] and " no " in rows["ddp on"] and " yes " in rows["fsdp off"]
    config = load(REPO / "configs/llama-7b.yaml")
    cluster = Cluster(gpus_per_node=8, gpu_mem_gib=80)
    assert result.stdout.strip() == format_plan(config, cluster, make_plan(config, cluster)).strip()


def test_layouts_the_engine_cannot_run_are_not_offered():
    config = load(REPO / "configs/llama-13b.yaml")
    labels = {p.layout.label() for p in make_plan(config, Cluster(gpus_per_node=8, gpu_mem_gib=80, nodes=2))}
    assert "fsdp_tp tp=8" in labels and "tp tp=16" not in labels  # 40 heads do not split 16 ways
    tied = load(REPO / "configs/llama-1b.yaml")
    strategies = {p.layout.strategy for p in make_plan(tied, Cluster(gpus_per_node=8, gpu_mem_gib=80))}
    assert strategies == {"ddp", "zero1", "zero2", "fsdp"}  # config.py refuses tied embeddings with tp or pp
    one_gpu = make_plan(load(REPO / "configs/gpt2-124m.yaml"), Cluster(gpus_per_node=1, gpu_mem_gib=80))
    assert [(p.layout.strategy, p.layout.activation_checkpointing) for p in one_gpu] == [("ddp", False), ("ddp", True)]
    assert one_gpu[0].configured


def test_plan_command_refuses_a_cluster_of_nothing():
    result = subprocess.run([sys.executable, "-m", "llmpipe.cli", "plan", "--config", "configs/llama-7b.yaml",
                             "--gpus", "0", "--gpu-mem", "80"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "--gpus 0" in result.stderr and "Traceback" not in result.stderr
