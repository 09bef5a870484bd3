"""Post-training: which methods are in the graph, the instruction data, SFT, DPO, the reward model and PPO/GRPO."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator

from llmpipe.config.base import Section
from llmpipe.config.training import TrainSection

ALIGN_METHODS = ("dpo", "ppo")  # post-training methods built on sft


class AlignSection(Section):
    """Which post-training stages are in the graph: sft always; reward and ppo with ppo; dpo with dpo."""

    methods: list[Literal[ALIGN_METHODS]] = list(ALIGN_METHODS)  # e.g. [dpo]; [] stops after sft

    @field_validator("methods")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value


def _paths(value: Any) -> list[Path] | None:
    """A path or a list of paths (files, or `datasets` folders) -> a list of existing paths."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (str, Path)) for v in items):
        raise ValueError("expected a path or a list of paths")
    paths = [Path(v) for v in items]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"path does not exist: {', '.join(missing)}")
    if not paths:
        raise ValueError("an empty list; leave the key out to use the instruct stage's files")
    return paths


DataPaths = Annotated[list[Path] | None, BeforeValidator(_paths)]

INSTRUCT_TASKS = ("add", "subtract", "multiply", "reverse", "uppercase", "count", "sort_words")


class InstructSection(Section):
    """The default instruction data, made offline: the installed standard library's documentation
    and verifiable tasks whose answers the checker computes. Owned by llmpipe/alignment/instruct.py."""

    doc_examples: int = Field(1500, ge=0)  # conversations about documented standard-library objects
    task_examples: int = Field(1500, ge=0)  # verifiable tasks (tasks below), each with its checked answer
    tasks: list[Literal[INSTRUCT_TASKS]] = list(INSTRUCT_TASKS)  # kinds of verifiable task
    max_operand: int = Field(99, ge=1)  # arithmetic operands are drawn from 0..max_operand
    heldout_fraction: float = Field(0.1, gt=0, lt=1)  # share of questions held out, chosen by hash
    modules: list[str] = []  # standard-library modules documented; empty: every public module pydoc lists


class PostTrainSection(TrainSection):
    """What SFT, DPO (and the reward model, PPO) add to the shared training keys: their data.
    Batches count tokens as in pretraining: batch_tokens = sequences per step * model.seq_len."""

    data: DataPaths = None  # training rows: JSONL, Parquet or a `datasets` folder; unset: the instruct stage's
    heldout_data: DataPaths = None  # held-out rows, same formats; unset: the instruct stage's
    max_steps: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(25, ge=0)
    checkpoint_every: int = Field(25, ge=0)
    spike_factor: float = Field(0.0, ge=0)  # off: post-training losses fall fast and legitimately jump


class SFTSection(PostTrainSection):
    """Supervised fine-tuning on conversations, loss on assistant tokens. Owned by llmpipe/alignment/sft.py."""

    packing: bool = True  # short examples share a row; attention and positions restart per example
    max_length: int | None = Field(None, ge=8)  # tokens per rendered example; longer rows are skipped; None: model.seq_len
    eval_prompts: int = Field(200, ge=0)  # held-out verifiable prompts answered greedily at the end (task accuracy)
    max_new_tokens: int = Field(32, ge=1)  # answer length limit for that check


class DPOReferenceSection(Section):
    """The reference (SFT) log-probs of every preference pair, computed once. Its cache key covers
    the reference weights, the preference data and the rendering, not DPO's own keys."""

    execution_fields: ClassVar[frozenset[str]] = frozenset({"micro_batch_size", "device"})

    max_length: int | None = Field(None, ge=8)  # tokens of prompt + longer completion; longer pairs skipped; None: model.seq_len
    micro_batch_size: int = Field(16, ge=1)  # pairs per forward
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DPOSection(PostTrainSection):
    """Direct preference optimisation against the cached reference. Owned by llmpipe/alignment/dpo.py."""

    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # -logsigmoid(beta * margin) (DPO) or (margin - 1/(2 beta))^2 (IPO)
    beta: float = Field(0.1, gt=0)  # strength of the implicit KL constraint to the reference
    max_steps: int = Field(60, ge=1)
    lr: float = Field(3e-4, gt=0)


class RewardSection(PostTrainSection):
    """A reward model trained on the preference data (Bradley-Terry), from SFT. Owned by
    llmpipe/alignment/reward.py. Batches count pairs: batch_tokens = pairs per step * model.seq_len."""

    center_coef: float = Field(0.0, ge=0)  # weight of mean (r_chosen + r_rejected)^2 (TRL's center_rewards_coefficient); 0: off
    max_length: int | None = Field(None, ge=8)  # tokens of prompt + longer completion; longer pairs skipped; None: model.seq_len
    max_steps: int = Field(60, ge=1)
    lr: float = Field(3e-4, gt=0)


class PPOSection(PostTrainSection):
    """RL from SFT: PPO against the reward model with a KL penalty to SFT (InstructGPT), or GRPO.
    Owned by llmpipe/alignment/ppo.py. Defaults are OpenRLHF's and verl's. `data`: RL prompts
    (default: the instruct stage's verifiable prompts). One optimizer step trains on
    batch_tokens / model.seq_len rollout responses; a rollout batch serves `epochs` passes."""

    reward: Literal["model", "checker"] = "model"  # the reward model's score, or 1/0 by the task checker
    advantage: Literal["gae", "grpo"] = "gae"  # PPO with a critic (from the reward model), or group-relative
    rollout_prompts: int = Field(16, ge=1)  # prompts per rollout batch (all ranks)
    group_size: int | None = Field(None, ge=1)  # samples per prompt; None: 1 with gae, 8 with grpo
    epochs: int = Field(4, ge=1)  # passes over each rollout batch
    max_new_tokens: int = Field(32, ge=1)  # response length limit
    temperature: float = Field(1.0, gt=0)  # sampling of rollouts (held-out answers are greedy)
    top_p: float = Field(1.0, gt=0, le=1)
    truncation_penalty: float = Field(1.0, ge=0)  # subtracted from the score of a response cut off before its <|end|>
    kl_coef: float = Field(0.05, ge=0)  # gae: per-token reward -kl_coef * (logp - ref_logp)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)  # GAE's lambda
    clip: float = Field(0.2, gt=0)  # policy ratio clip
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)  # weight of the value loss
    whiten_advantages: bool = True  # gae: advantages scaled to mean 0, std 1 over the rollout batch
    grpo_kl_coef: float = Field(0.04, ge=0)  # grpo: weight of the k3 KL-to-reference loss term; 0: off
    scale_rewards: bool = True  # grpo: divide by the group's std (False: Dr. GRPO)
    generation_batch_size: int = Field(16, ge=1)  # responses per generate / scoring forward
    eval_prompts: int = Field(200, ge=0)  # held-out prompts answered greedily at the end (rm_score, task accuracy)
    max_steps: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size or (8 if self.advantage == "grpo" else 1)
