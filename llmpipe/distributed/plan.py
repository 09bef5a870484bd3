"""The memory planner: memory per GPU of one training step under each parallel layout, and which fit.

Pure arithmetic over the config: no devices, no torch.distributed. It counts what the engine
(llmpipe/distributed/parallelize.py) really holds, and the activations the model really saves for
backward (checked against `saved_tensors_hooks` and against the peak memory of real CPU steps in
tests/test_plan.py). Estimates are for eager mode: torch.compile usually saves less, because its
partitioner recomputes elementwise operations in backward.

Precision: fp32 everywhere on the CPU. On GPUs, ddp, zero1, tp and pp run under bf16 autocast
(fp32 parameters, bf16 matmuls); zero2, fsdp and fsdp_tp use FSDP mixed precision instead (bf16
gathered parameters and activations, fp32 master weights, gradients reduced in fp32).

Memory per GPU, for the psi parameters a rank holds after tensor (tp) and pipeline (pp) splitting,
d data-parallel ranks (d = world / (tp * pp)):

    weights      fp32 master weights, 4 psi (4 psi / d when sharded: zero2, fsdp, fsdp_tp)
                 + bf16 compute copies: autocast's casts saved for backward (ddp, zero1, tp, pp:
                 2 psi), every gathered parameter kept after forward (zero2: 2 psi), or the
                 gathered parameters of the computed and the prefetched block plus the root
                 module's (embedding, head), which FSDP does not reshard after forward (fsdp, fsdp_tp)
    grads        fp32, 4 psi, + DDP's buckets, a second 4 psi (ddp, zero1 with d > 1); sharded
                 strategies: 4 psi / d, + 4 psi while accumulating (by default the engine skips
                 the reduce-scatter until the last micro-batch, and FSDP keeps the unsharded
                 gradients in fp32 meanwhile) or, with one micro-batch per step or with
                 `grad_sync: micro_batch`, two blocks' unsharded bf16 gradients and their fp32
                 reduce copies
    optimizer    AdamW's two fp32 states, 8 psi (8 psi / d with zero1, zero2, fsdp, fsdp_tp)
    activations  what autograd saves for backward at the configured micro-batch (see
                 `_block_activation_bytes`) for every block on the rank and micro-batch in flight,
                 plus the final norm and the loss's saved tensors (untied head: the fp32
                 log-softmax; tied head, chunked: the gradients of its input and of the table),
                 plus the largest transient: the loss's (tokens, vocab) fp32 gradients (one chunk
                 of them with a tied head), or with activation checkpointing the one block being
                 recomputed, if larger

    total        the sum: with gradient accumulation the gradients of earlier micro-batches are
                 held while the next one runs. (With a single micro-batch per step gradients
                 grow while activations are freed, and the sum overestimates by up to the grads.)

A layout fits when its total is at most USABLE_FRACTION of the GPU's memory (the rest is left to
the CUDA context, NCCL buffers and allocator fragmentation, which are not modelled).

The step time is a rough estimate, only good for ranking layouts against each other: compute
(flops_per_token * tokens, x 4/3 with activation checkpointing) at MFU_GUESS of the peak, slowed
by the pipeline bubble (pp - 1) / (virtual stages * micro-batches) and by uneven stages;
data-parallel traffic (gradient all-reduce or reduce-scatter once per step, or every
micro-batch with `grad_sync: micro_batch`; FSDP's parameter all-gathers every micro-batch)
overlaps with compute, so the step takes the longer of the two; tensor-parallel and pipeline
traffic is added on top. Traffic inside a node moves at NVLINK_BYTES_PER_S, between nodes at
NETWORK_BYTES_PER_S per GPU; ranks are numbered tp first (llmpipe/distributed/env.py), so a
group crosses nodes when it is wider than a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llmpipe.config import SHARDED_STRATEGIES, ModelSection, RunConfig, TrainSection
from llmpipe.model.model import LOSS_CHUNK_ROWS, flops_per_token, parameter_count

GIB = 2**30
FP32 = 4  # bytes per value
BF16 = 2
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32
USABLE_FRACTION = 0.9  # of a GPU's memory that a plan may use
PREFETCHED_BLOCKS = 2  # FSDP gathers the block it computes and prefetches the next one
RECOMPUTE_FACTOR = 4 / 3  # activation checkpointing repeats each block's forward: +1/3 of the step
H100_BF16_PEAK_FLOPS = 989e12  # dense; used unless pretrain.peak_flops is set
MFU_GUESS = 0.4  # model FLOPs utilisation of a well-tuned bf16 step
NVLINK_BYTES_PER_S = 300e9  # collective bus bandwidth per GPU inside a node (H100 NVLink)
NETWORK_BYTES_PER_S = 40e9  # per GPU between nodes (one 400 Gb/s NIC per GPU)

SHARDED_OPTIMIZER = ("zero1", *SHARDED_STRATEGIES)


@dataclass(frozen=True)
class Cluster:
    """The machines a plan is made for."""

    gpus_per_node: int
    gpu_mem_gib: float
    nodes: int = 1
    peak_flops: float = H100_BF16_PEAK_FLOPS

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Layout:
    """One way to spread training: a strategy with its degrees, and activation checkpointing."""

    strategy: str
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1  # model chunks per rank (interleaved_1f1b)
    activation_checkpointing: bool = False
    grad_sync: str = "step"  # sharded strategies: reduce-scatter once per step or every micro-batch

    def label(self) -> str:
        if self.strategy == "pp":
            virtual = f" v={self.pp_virtual_stages}" if self.pp_schedule == "interleaved_1f1b" else ""
            return f"pp={self.pp} {self.pp_schedule}{virtual}"
        label = f"{self.strategy} tp={self.tp}" if self.strategy in ("tp", "fsdp_tp") else self.strategy
        return label + (" grad_sync=micro_batch" if self.grad_sync == "micro_batch" else "")


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU at the step's peak."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    fits: bool
    step_time_s: float
    configured: bool  # the layout the config asks for


def configured_layout(train: TrainSection) -> Layout:
    """The layout `pretrain.parallel` asks for, with degrees a strategy does not use left at 1.

    One process runs the plain model whatever the strategy; it is listed as ddp.
    """
    p, ac = train.parallel, train.activation_checkpointing
    if train.world_size == 1:
        return Layout("ddp", activation_checkpointing=ac)
    if p.strategy == "pp":
        virtual = p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1
        return Layout("pp", pp=p.pp, pp_schedule=p.pp_schedule, pp_virtual_stages=virtual, activation_checkpointing=ac)
    return Layout(p.strategy, tp=p.tp if p.strategy in ("tp", "fsdp_tp") else 1, activation_checkpointing=ac,
                  grad_sync=p.grad_sync)


def precision(train: TrainSection, strategy: str) -> str:
    """fp32 on the CPU; on GPUs "bf16" (FSDP mixed precision) for the sharded strategies, "autocast" else."""
    if train.dtype == "float32" or train.device == "cpu":
        return "fp32"
    return "bf16" if strategy in SHARDED_STRATEGIES else "autocast"


# --- sizes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    block: int  # parameters of one transformer block
    embedding: int  # the input table
    head: int  # the output matrix (the input table again when tied) and the final norm


def _sizes(model: ModelSection) -> _Sizes:
    one, two = (parameter_count(model.model_copy(update={"n_layers": n}), embedding=False) for n in (1, 2))
    block = two - one
    table = model.vocab_size * model.d_model
    return _Sizes(block=block, embedding=table, head=one - block)


def _block_activation_bytes(model: ModelSection, mode: str) -> tuple[float, float]:
    """Bytes autograd saves per token in one block: (split by tp with sequence parallel, not split).

    fp32: for attention and for the MLP, RMSNorm's input and x * rsqrt (4 C), and the norm output
    the linears share (2 C); q and the attention output (2 C: its transpose is the layout SDPA
    returns, no copy); k and v (2 nkv hs); the SwiGLU gate, its silu, up and product (4 F);
    SDPA's log-sum-exp (nh) and each norm's 2-norm and rsqrt (4). All x 4 bytes.
    autocast: the residual and x * rsqrt stay fp32 (4 C x 4 bytes); each linear saves its own bf16
    cast of the norm output (3 for q, k, v and 2 for gate and up: 5 C x 2 bytes); q, the attention
    output, k, v and the SwiGLU tensors are bf16; log-sum-exp and rsqrt fp32.
    bf16 (FSDP mixed precision): the norm upcasts its bf16 input (2 C x 4 bytes) and saves
    x * rsqrt cast back to bf16 and its output (4 C x 2 bytes); the rest as under autocast.
    With sequence parallel the norms work on T / tp and the heads and F are split by tp, but each
    linear saves its all-gathered (B, T, C) input whole: that part is the second number.
    """
    C, F = model.d_model, model.d_ff
    hs, nkv = model.d_model // model.n_heads, model.n_kv_heads or model.n_heads
    scalars = FP32 * (model.n_heads + 4)  # log-sum-exp per head; each norm's 2-norm and rsqrt
    if mode == "fp32":
        return FP32 * (6 * C + 2 * nkv * hs + 4 * F) + scalars, FP32 * 2 * C
    bf16_tensors = BF16 * (2 * C + 2 * nkv * hs + 4 * F)  # q, attention output, k, v, SwiGLU
    if mode == "autocast":
        return FP32 * 4 * C + bf16_tensors + scalars, BF16 * 5 * C
    return FP32 * 2 * C + BF16 * 2 * C + bf16_tensors + scalars, BF16 * 2 * C


def _head_activation_bytes(model: ModelSection, mode: str, tp: int) -> tuple[float, float, float, float]:
    """(saved per token, transient per token, saved per micro-batch, transient per micro-batch).

    The final norm saves as one of a block's (sequence-split) and the head's input (gathered).
    An untied head: log_softmax saves its fp32 output (vocabulary-split with loss parallel); in
    backward the loss's and the logits' fp32 gradients exist at once. A tied head takes the
    chunked `LinearCrossEntropy`, which saves the gradients of its input (per token) and of the
    table (V x C) and holds one chunk's fp32 logits at a time, plus logsumexp's temporary.
    """
    C, V = model.d_model, model.vocab_size
    norm = {"fp32": (FP32 * 2 * C, FP32 * C), "autocast": (FP32 * 2 * C, BF16 * C),
            "bf16": (FP32 * C + BF16 * C, BF16 * C)}[mode]
    norm_saved = norm[0] / tp + norm[1]
    if model.tie_embeddings:  # never tensor-parallel (config.py)
        activation = BF16 if mode == "bf16" else FP32
        chunk = 2 * FP32 * LOSS_CHUNK_ROWS * V  # logits (their gradient in place) and exp(logits - max)
        return norm[0] + activation * C, 0.0, activation * V * C, chunk  # it saves no logits input
    return norm_saved + FP32 * V / tp, 2 * FP32 * V / tp, 0.0, 0.0


def _block_input_bytes(model: ModelSection, mode: str) -> int:
    """Per token: what activation checkpointing keeps of a block, its input (the residual stream)."""
    return (BF16 if mode == "bf16" else FP32) * model.d_model


# --- memory ------------------------------------------------------------------------------------


def _in_flight(layout: Layout, micro_batches: int, stage: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at once."""
    if layout.pp == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return micro_batches
    warmup = min(micro_batches, layout.pp - stage)  # 1F1B: forwards ahead of the first backward
    if layout.pp_schedule == "interleaved_1f1b":
        # Narayanan et al. 2021: interleaving holds (1 + (pp - 1) / (pp * v)) x more on the first stage
        return warmup * (1 + (layout.pp - 1) / (layout.pp * layout.pp_virtual_stages))
    return warmup


def micro_batches_per_step(model: ModelSection, train: TrainSection, layout: Layout, world: int) -> int:
    """Micro-batches each data-parallel replica runs per optimizer step (at least 1)."""
    replicas = world // (layout.tp * layout.pp)
    return max(1, train.batch_tokens // (train.micro_batch_for(model.seq_len, replicas) * model.seq_len * replicas))


def _stage_memory(model: ModelSection, train: TrainSection, layout: Layout, world: int, stage: int) -> Memory:
    sizes, mode = _sizes(model), precision(train, layout.strategy)
    compute_bytes = FP32 if mode == "fp32" else BF16
    tp, pp = layout.tp, layout.pp
    d = world // (tp * pp)
    micro_batches = micro_batches_per_step(model, train, layout, world)
    first, last = stage == 0, stage == pp - 1
    blocks = math.ceil(model.n_layers / pp)
    own_table = 0 if model.tie_embeddings else sizes.embedding  # a tied table is counted in the head
    psi = (blocks * sizes.block + (own_table if first else 0) + (sizes.head if last else 0)) / tp
    matmul = (blocks * sizes.block + (sizes.embedding if last else 0)) / tp  # what autocast casts

    if layout.strategy in SHARDED_STRATEGIES:
        if layout.strategy == "zero2":
            gathered = psi
        else:
            gathered = (PREFETCHED_BLOCKS * sizes.block + own_table + sizes.head) / tp
        weights = FP32 * psi / d + compute_bytes * gathered
        if micro_batches > 1 and layout.grad_sync == "step":
            unsharded = FP32 * psi  # accumulated in fp32 until the last micro-batch reduce-scatters
        else:  # reduce-scattered as backward goes: two blocks' bf16 gradients and their fp32 reduce copies
            unsharded = (compute_bytes + (FP32 if compute_bytes != FP32 else 0)) * PREFETCHED_BLOCKS * sizes.block / tp
        grads = FP32 * psi / d + unsharded
    else:
        weights = FP32 * psi + (BF16 * matmul if mode == "autocast" else 0)
        buckets = FP32 * psi if layout.strategy in ("ddp", "zero1") and d > 1 else 0
        grads = FP32 * psi + buckets
    optimizer = ADAMW_STATES * FP32 * psi / (d if layout.strategy in SHARDED_OPTIMIZER else 1)

    tokens = train.micro_batch_for(model.seq_len, d) * model.seq_len
    split, whole = _block_activation_bytes(model, mode)
    full_block = split / tp + whole
    stored_block = _block_input_bytes(model, mode) / tp if layout.activation_checkpointing else full_block
    head_saved, head_transient, head_saved_fixed, head_transient_fixed = \
        _head_activation_bytes(model, mode, tp) if last else (0.0, 0.0, 0.0, 0.0)
    in_flight = _in_flight(layout, micro_batches, stage)
    transient = max(tokens * head_transient + head_transient_fixed,
                    tokens * full_block if layout.activation_checkpointing else 0.0)
    activations = in_flight * (tokens * (blocks * stored_block + head_saved) + head_saved_fixed) + transient
    return Memory(weights=weights, grads=grads, optimizer=optimizer, activations=activations)


def memory_per_gpu(model: ModelSection, train: TrainSection, layout: Layout, world: int) -> Memory:
    """The most loaded rank's memory (pipelines: the first or the last stage)."""
    stages = {0, layout.pp - 1}
    return max((_stage_memory(model, train, layout, world, s) for s in stages), key=lambda m: m.total)


# --- time --------------------------------------------------------------------------------------


def _ring(bytes_per_rank: float, ranks: int, crosses_nodes: bool) -> float:
    """Seconds for a ring collective moving (ranks - 1) / ranks of bytes_per_rank through each GPU."""
    if ranks <= 1:
        return 0.0
    bandwidth = NETWORK_BYTES_PER_S if crosses_nodes else NVLINK_BYTES_PER_S
    return bytes_per_rank * (ranks - 1) / ranks / bandwidth


def step_time_s(model: ModelSection, train: TrainSection, layout: Layout, cluster: Cluster) -> float:
    """A rough estimate of one optimizer step's seconds (see the module docstring)."""
    world = cluster.world_size
    compute_bytes = FP32 if precision(train, layout.strategy) == "fp32" else BF16
    tp, pp = layout.tp, layout.pp
    d = world // (tp * pp)
    micro = micro_batches_per_step(model, train, layout, world)
    peak = train.peak_flops or cluster.peak_flops
    recompute = RECOMPUTE_FACTOR if layout.activation_checkpointing else 1.0
    compute = flops_per_token(model) * train.batch_tokens * recompute / (world * peak * MFU_GUESS)
    if pp > 1:  # the slowest stage sets the pace, and the pipeline fills and drains once per step
        balance = math.ceil(model.n_layers / pp) * pp / model.n_layers
        compute *= balance * (1 + (pp - 1) / (layout.pp_virtual_stages * micro))

    psi = parameter_count(model) / (tp * pp)
    dp_crosses = world > cluster.gpus_per_node and d > 1
    gradients = FP32 * psi  # reduced once per step, on the last micro-batch
    if layout.strategy == "ddp":
        data_parallel = _ring(2 * gradients, d, dp_crosses)  # all-reduce
    elif layout.strategy == "zero1":
        data_parallel = _ring(3 * gradients, d, dp_crosses)  # all-reduce, then the updated shards broadcast
    elif layout.strategy in SHARDED_STRATEGIES:  # reduce-scatter + parameter all-gathers every micro-batch
        gathers = 1 if layout.strategy == "zero2" else 2  # fsdp gathers again for backward
        reductions = micro if layout.grad_sync == "micro_batch" else 1
        data_parallel = (reductions * _ring(gradients, d, dp_crosses)
                         + micro * gathers * _ring(compute_bytes * psi, d, dp_crosses))
    else:
        data_parallel = 0.0

    activation = train.micro_batch_for(model.seq_len, d) * model.seq_len * model.d_model * compute_bytes
    # sequence parallel: 2 all-gathers + 2 reduce-scatters per block forward, as many in backward
    collectives = (8 + (4 if layout.activation_checkpointing else 0)) * model.n_layers / pp
    tensor_parallel = micro * collectives * _ring(activation, tp, tp > cluster.gpus_per_node)
    # pipeline: each micro-batch's activations forward and their gradients backward, stage to stage
    link = NETWORK_BYTES_PER_S if world > cluster.gpus_per_node else NVLINK_BYTES_PER_S
    pipeline = micro * 2 * activation / link if pp > 1 else 0.0
    return max(compute, data_parallel) + tensor_parallel + pipeline


# --- the plan ----------------------------------------------------------------------------------


def candidate_layouts(model: ModelSection, train: TrainSection, world: int) -> list[Layout]:
    """Every layout the engine can run on `world` GPUs, each without and with activation checkpointing,
    the sharded ones also reduce-scattering every micro-batch when a step has several.

    Tensor parallelism needs heads, key/value heads, d_ff, the vocabulary and the sequence to split
    evenly (llmpipe/distributed/tensor_parallel.py); a pipeline needs a block per stage (per virtual
    stage with interleaved_1f1b).
    """
    split_evenly = (model.n_heads, model.n_kv_heads or model.n_heads, model.d_ff, model.vocab_size, model.seq_len)
    tp_degrees = [t for t in range(2, world + 1) if world % t == 0 and all(n % t == 0 for n in split_evenly)]
    shapes = [Layout(s) for s in ("ddp", "zero1", "zero2", "fsdp")] if world > 1 else [Layout("ddp")]
    if world > 1 and not model.tie_embeddings:  # config.py allows a tied table only with data parallelism
        shapes += [Layout("tp", tp=world)] if world in tp_degrees else []
        shapes += [Layout("fsdp_tp", tp=t) for t in tp_degrees if t < world]
        v = train.parallel.pp_virtual_stages if train.parallel.pp_virtual_stages > 1 else 2
        shapes += [Layout("pp", pp=world, pp_schedule=s) for s in ("gpipe", "1f1b") if model.n_layers >= world]
        if model.n_layers >= world * v:
            shapes.append(Layout("pp", pp=world, pp_schedule="interleaved_1f1b", pp_virtual_stages=v))
    shapes += [replace(s, grad_sync="micro_batch") for s in shapes  # accumulating: when to reduce-scatter
               if s.strategy in SHARDED_STRATEGIES and micro_batches_per_step(model, train, s, world) > 1]
    return [replace(s, activation_checkpointing=ac) for s in shapes for ac in (False, True)]


def make_plan(config: RunConfig, cluster: Cluster) -> list[Plan]:
    """All candidate layouts on `cluster`: fitting ones first, fastest first."""
    model, train, world = config.model, config.pretrain, cluster.world_size
    mine = configured_layout(train) if train.world_size == world else None
    layouts = candidate_layouts(model, train, world)
    if mine is not None and mine not in layouts:
        layouts.append(mine)
    usable = USABLE_FRACTION * cluster.gpu_mem_gib * GIB
    plans = []
    for layout in layouts:
        memory = memory_per_gpu(model, train, layout, world)
        plans.append(Plan(layout, memory, memory.total <= usable, step_time_s(model, train, layout, cluster),
                          configured=layout == mine))
    return sorted(plans, key=lambda p: (not p.fits, p.step_time_s, p.memory.total))


def format_plan(config: RunConfig, cluster: Cluster, plans: list[Plan]) -> str:
    """The table `llmpipe plan` prints."""
    model, train = config.model, config.pretrain
    mode = "fp32" if precision(train, "ddp") == "fp32" else "bf16 on GPUs"
    fastest = min((p.step_time_s for p in plans if p.fits), default=None)
    lines = [f"{config.run.name}: {parameter_count(model) / 1e9:.2f}B parameters on {cluster.nodes} x "
             f"{cluster.gpus_per_node} GPUs of {cluster.gpu_mem_gib:g} GiB ({mode}, micro-batch "
             f"{train.micro_batch_size} x {model.seq_len} tokens, {train.batch_tokens:,} tokens per step)",
             f"GiB per GPU; fits: total <= {USABLE_FRACTION:.0%} of the GPU; step: estimated time relative to "
             f"the fastest plan that fits (rough)",
             "",
             f"  {'plan':<34} {'AC':<3} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7}  fits  step"]
    for p in plans:
        m = p.memory
        step = f"x{p.step_time_s / fastest:.2f}" if fastest else f"{p.step_time_s:.1f}s"
        lines.append(f"{'*' if p.configured else ' '} {p.layout.label():<34} {'on' if p.layout.activation_checkpointing else 'off':<3} "
                     f"{m.weights / GIB:8.1f} {m.grads / GIB:7.1f} {m.optimizer / GIB:7.1f} {m.activations / GIB:7.1f} "
                     f"{m.total / GIB:7.1f}  {'yes' if p.fits else 'no ':<4}  {step}")
    if fastest:
        lines.append(f"\nfastest plan that fits: ~{fastest:.1f} s per step")
    if model.tie_embeddings and cluster.world_size > 1:
        lines.append("(tp, pp and fsdp_tp are not listed: they need model.tie_embeddings: false)")
    if not any(p.configured for p in plans):
        lines.append(f"(the config's own plan uses {train.world_size} GPUs, not {cluster.world_size})")
    else:
        lines.append("* the config's plan (pretrain.parallel, pretrain.activation_checkpointing)")
    return "\n".join(lines)
