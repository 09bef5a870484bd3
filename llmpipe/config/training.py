"""The model and what every training stage shares: optimizer, schedule, cadence, precision, parallelism."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from llmpipe.config.base import Section


class ModelSection(Section):
    """The decoder-only transformer (Llama layout). Owned by llmpipe/model."""

    vocab_size: int = Field(10_000, ge=300)  # >= tokenizer.vocab_size; round up to a multiple of 64 on GPU
    d_model: int = Field(128, ge=8)  # residual stream width
    n_layers: int = Field(6, ge=1)  # transformer blocks
    n_heads: int = Field(8, ge=1)  # query heads; head size = d_model / n_heads, must be even (rotary)
    n_kv_heads: int | None = None  # grouped-query attention; None -> n_heads
    d_ff: int = Field(256, ge=8)  # SwiGLU hidden size
    seq_len: int = Field(256, ge=8)  # context length
    tie_embeddings: bool = True  # output head shares the input embedding table
    rope_theta: float = Field(10_000.0, gt=0)  # rotary base
    norm_eps: float = Field(1e-5, gt=0)  # RMSNorm epsilon
    init_std: float = Field(0.02, gt=0)  # N(0, init_std) init; residual projections / sqrt(2 * n_layers)

    @model_validator(mode="after")
    def _heads(self) -> "ModelSection":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for rotary embeddings")
        kv = self.n_kv_heads or self.n_heads
        if kv > self.n_heads or self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        return self


SHARDED_STRATEGIES = ("zero2", "fsdp", "fsdp_tp")  # FSDP2 shards gradients (and parameters) over data parallel


class ParallelConfig(Section):
    """How a training stage spreads over its `nproc` processes; applied by llmpipe/distributed.

    ddp: replicas; zero1: + sharded optimizer states; zero2: + sharded gradients (FSDP2 without
    resharding after forward); fsdp: + sharded parameters (ZeRO-3); tp: tensor parallel (with
    sequence and loss parallel); pp: pipeline stages; fsdp_tp: FSDP over nproc/tp ranks x TP over tp.
    """

    strategy: Literal["ddp", "zero1", "zero2", "fsdp", "tp", "pp", "fsdp_tp"] = "ddp"
    tp: int = Field(1, ge=1)  # tensor-parallel degree (tp: = nproc; fsdp_tp: divides nproc)
    pp: int = Field(1, ge=1)  # pipeline stages (pp: = nproc)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"  # torch.distributed.pipelining schedule
    pp_virtual_stages: int = Field(2, ge=1)  # model chunks per rank with interleaved_1f1b
    # when gradient accumulation reduces gradients over the data-parallel ranks: once per step (the
    # step's last micro-batch; least traffic, but FSDP holds whole fp32 gradients until then) or
    # after every micro-batch (zero2, fsdp, fsdp_tp: only the shards are held, as ZeRO-3 intends)
    grad_sync: Literal["step", "micro_batch"] = "step"

    @model_validator(mode="after")
    def _grad_sync(self) -> "ParallelConfig":
        if self.grad_sync == "micro_batch" and self.strategy not in SHARDED_STRATEGIES:
            raise ValueError(f"grad_sync=micro_batch needs a strategy that shards gradients "
                             f"({', '.join(SHARDED_STRATEGIES[:-1])} or {SHARDED_STRATEGIES[-1]}), not {self.strategy}")
        return self


class TrainSection(Section):
    """What every training stage shares: optimizer, schedule, loop cadence, precision, parallelism.

    Pretraining uses it as is; SFT, reward, DPO and PPO extend it with their data and loss keys.
    """

    # `nproc` and `parallel` say how to compute, not what: a finished stage stays cached when they
    # change, and a resumed run may use another layout (checkpoints reshard).
    execution_fields: ClassVar[frozenset[str]] = frozenset({"nproc", "nnodes", "parallel", "launcher", "rdzv_endpoint"})

    max_steps: int = Field(200, ge=1)  # optimizer steps
    batch_tokens: int = Field(8192, ge=1)  # global batch in tokens = micro_batch_size * seq_len * accumulation * data-parallel ranks
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward on one rank (at most: see micro_batch_for)
    lr: float = Field(3e-3, gt=0)  # peak learning rate, reached after warmup
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = Field(20, ge=0)  # linear warmup from 0 (capped at max_steps)
    weight_decay: float = Field(0.1, ge=0)  # AdamW decay, on matrices only (not norms)
    beta1: float = Field(0.9, ge=0, lt=1)  # AdamW first-moment decay
    beta2: float = Field(0.95, ge=0, lt=1)  # AdamW second-moment decay
    eps: float = Field(1e-8, gt=0)  # AdamW epsilon
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping
    eval_every: int = Field(50, ge=0)  # steps between validation losses; 0 = only at the end
    eval_steps: int = Field(8, ge=1)  # validation micro-batches per evaluation (fixed, unshuffled)
    checkpoint_every: int = Field(50, ge=0)  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept on disk
    log_every: int = Field(10, ge=1)  # steps between logged training metrics
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    spike_factor: float = Field(3.0, ge=0)  # stop when loss > factor * running mean; 0 disables (NaN/inf always stop)
    spike_warmup: int = Field(50, ge=0)  # steps before the spike guard arms
    peak_flops: float | None = Field(None, gt=0)  # device peak FLOP/s for MFU; None: measured matmul (CPU) or table (GPU)
    nproc: int = Field(1, ge=1)  # processes per node; > 1 runs the stage as `torchrun --nproc-per-node nproc`
    nnodes: int = Field(1, ge=1)  # nodes; > 1: the workers are started by `launcher` (see README, Scale-out)
    # nnodes > 1: slurm submits scripts/slurm/pretrain.sbatch with `sbatch --wait`; torchrun prints the command
    # to run on each node and waits for the workers' result
    launcher: Literal["torchrun", "slurm"] = "torchrun"
    rdzv_endpoint: str | None = None  # launcher torchrun, nnodes > 1: the c10d rendezvous host:port; default this host:29500
    parallel: ParallelConfig = ParallelConfig()

    @field_validator("spike_factor")
    @classmethod
    def _spike(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError(f"spike_factor={value} must be 0 (off) or greater than 1")
        return value

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def micro_batch_for(self, seq_len: int, dp: int) -> int:
        """Sequences one rank runs per forward/backward: micro_batch_size, or the rank's whole share
        of batch_tokens when that is smaller (the tiny preset's 16 sequences on 2 ranks: 8 each),
        so that adding ranks keeps the global batch."""
        return max(1, min(self.micro_batch_size, self.batch_tokens // (seq_len * dp)))

    @model_validator(mode="after")
    def _layout(self) -> "TrainSection":
        p, n = self.parallel, self.world_size
        if p.strategy == "tp" and n > 1 and p.tp != n:
            raise ValueError(f"parallel.tp={p.tp} must equal nproc * nnodes={n} with strategy tp")
        if p.strategy == "fsdp_tp" and n > 1 and (p.tp < 2 or n % p.tp or n == p.tp):
            raise ValueError(f"parallel.tp={p.tp} must be >= 2 and divide nproc * nnodes={n} into >= 2 FSDP groups with strategy fsdp_tp")
        if p.strategy == "pp" and n > 1 and p.pp != n:
            raise ValueError(f"parallel.pp={p.pp} must equal nproc * nnodes={n} with strategy pp")
        return self


def tp_uneven(model: ModelSection, tp: int) -> list[str]:
    """The model sizes that do not split evenly over `tp` tensor-parallel ranks (the sequence too,
    for sequence parallelism), as `model.key=value`."""
    sizes = {"n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads or model.n_heads, "d_ff": model.d_ff,
             "vocab_size": model.vocab_size, "seq_len": model.seq_len}
    return [f"model.{name}={value}" for name, value in sizes.items() if value % tp]


def layout_error(name: str, train: TrainSection, model: ModelSection) -> str | None:
    """Why `model` cannot be laid out as the training section `name` asks, before any process starts."""
    p, n = train.parallel, train.world_size
    tp = n if p.strategy == "tp" else p.tp if p.strategy == "fsdp_tp" else 1
    if n > 1 and tp > 1 and (uneven := tp_uneven(model, tp)):
        return f"{', '.join(uneven)} must be divisible by {name}.parallel's tensor-parallel degree {tp}"
    stages = p.pp * (p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1)
    if n > 1 and p.strategy == "pp" and model.n_layers < stages:
        return (f"model.n_layers={model.n_layers} must be >= {name}.parallel.pp * stages per rank = {stages} "
                f"with parallel.pp_schedule={p.pp_schedule} (one block or more per stage)")
    return None


class PretrainSection(TrainSection):
    """Next-token pretraining on the shards. Owned by llmpipe/training."""

    # with crawl.refresh, new shards: continue from the last run's final checkpoint (its step, optimizer and
    # learning-rate schedule) for refresh_steps more steps, or restart from a random init
    refresh: Literal["continue", "restart"] = "continue"
    refresh_steps: int = Field(50, ge=1)
    # part of the key only where a run continues (stages.input_fingerprints)
    execution_fields: ClassVar[frozenset[str]] = TrainSection.execution_fields | {"refresh", "refresh_steps"}
