"""The `sft` stage: supervised fine-tuning of the pretrained model on conversations.

    python -m llmpipe.alignment.sft --config configs/tiny.yaml [--set sft.max_steps=50]

Loss on the assistant's tokens only (their content and `<|end|>`). With `sft.packing` (the
default) short examples share a row without seeing each other: positions restart and attention
stays inside each example (`llmpipe.alignment.render.pack`). The held-out assistant-token loss
is measured for the pretrained model before the first step, at `eval_every` and at the end; the
held-out verifiable prompts are answered greedily by both models and checked at the end.
Writes checkpoints while training (resumable, exactly), then `model.safetensors`,
`model_config.json` and `train_config.json`, as pretraining does.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from llmpipe.alignment.answers import task_accuracy
from llmpipe.alignment.data import RowCounts, load_conversations, load_prompts
from llmpipe.alignment.render import ChatEncoder, Encoded, model_inputs, pack, padded, stack_rows
from llmpipe.config import ModelSection, SFTSection
from llmpipe.context import StageContext, as_paths
from llmpipe.data.loader import RowLoader
from llmpipe.errors import BadValue
from llmpipe.model.model import flops_per_token
from llmpipe.model.release import WEIGHTS, load_release
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.tracking import NullTracker, Tracker
from llmpipe.training.trainer import Trainer, TrainTask, peak_memory_mb, steady_tokens_per_s


def assistant_loss_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The step function: mean cross-entropy over the batch's trained (assistant) tokens."""
    return model(batch["input_ids"], batch["targets"], **model_inputs(batch)), {}


def encode_conversations(encoder: ChatEncoder, conversations: list, max_length: int, counts: RowCounts) -> list[Encoded]:
    """Rendered conversations; one longer than `max_length` tokens is skipped and counted."""
    kept = []
    for conversation in conversations:
        encoded = encoder.conversation(conversation.messages)
        if len(encoded) > max_length:
            counts.skip(f"longer than max_length={max_length} tokens", conversation.source)
        else:
            kept.append(encoded)
    counts.require_rows(kept)
    return kept


def sft_rows(examples: list[Encoded], packing: bool, seq_len: int, seed: int) -> tuple[list, object]:
    """The loader's items and their collate: packed rows (in a seeded order of the examples), or
    single examples padded per micro-batch."""
    if not packing:
        return examples, padded
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return pack([examples[i] for i in order], seq_len), stack_rows


def trained_tokens(examples: list[Encoded]) -> int:
    return sum(sum(e.trained[1:]) for e in examples)


def run_sft(model_cfg: ModelSection, cfg: SFTSection, *, init_from: Path, tokenizer_dir: Path, data: list[Path],
            heldout: list[Path], prompts: list[Path], out_dir: Path, seed: int, tracker: Tracker | None = None,
            stop_after: int | None = None) -> dict:
    """Fine-tune the weights `init_from` into `out_dir`; return the stage's numbers."""
    tracker, out_dir = tracker or NullTracker(), Path(out_dir)
    max_length = cfg.max_length or model_cfg.seq_len
    if max_length > model_cfg.seq_len + 1:
        raise BadValue(f"sft.max_length={max_length} must be <= model.seq_len={model_cfg.seq_len}")
    encoder = ChatEncoder(load_tokenizer(tokenizer_dir))
    counts, heldout_counts, prompt_counts = RowCounts("sft.data"), RowCounts("sft.heldout_data"), RowCounts("prompts")
    train_examples = encode_conversations(encoder, load_conversations(data, counts), max_length, counts)
    heldout_examples = encode_conversations(encoder, load_conversations(heldout, heldout_counts), max_length,
                                            heldout_counts)
    counts.require_rows(train_examples)
    heldout_counts.require_rows(heldout_examples)

    trainer = Trainer(model_cfg, cfg, seed=seed, init_from=init_from, section="sft")
    main, micro, dp = trainer.env.is_main, trainer.micro_batch_size, trainer.dp_size
    if trainer.parallel.schedule is not None:
        raise BadValue("sft.parallel.strategy=pp is not supported (rows carry per-example masks); "
                       "use ddp, zero1, zero2, fsdp, tp or fsdp_tp")
    items, collate = sft_rows(train_examples, cfg.packing, model_cfg.seq_len, seed)
    val_items, val_collate = sft_rows(heldout_examples, cfg.packing, model_cfg.seq_len, seed)
    train_loader = RowLoader(items, micro, collate, seed=seed, rank=trainer.dp_rank, world_size=dp)
    val_loader = RowLoader(val_items, micro, val_collate, seed=seed, rank=trainer.dp_rank, world_size=dp,
                           shuffle=False)
    eval_steps = max(1, len(val_items) // (micro * dp))  # every held-out row once (the last partial batch left out)
    task = TrainTask("sft", assistant_loss_step, train_loader, flops_per_token=flops_per_token(model_cfg),
                     val_loader=val_loader, eval_steps=eval_steps)
    config = {"model": model_cfg.model_dump(mode="json"), "sft": cfg.model_dump(mode="json"), "seed": seed}

    base_loss = trainer.evaluate(task)  # the pretrained weights, before any checkpoint is loaded
    state = trainer.resume(out_dir / "checkpoints", task)
    resumed_from, resumed_tokens = state.step, state.tokens
    state = trainer.fit(task, state, ckpt_root=out_dir / "checkpoints", config=config, tracker=tracker,
                        stop_after=stop_after)
    slot_tokens_per_s = steady_tokens_per_s(state, state.step - resumed_from, state.tokens - resumed_tokens)
    useful_share = trained_tokens(train_examples) / (len(items) * model_cfg.seq_len) if cfg.packing else math.nan
    result = {
        "steps": state.step,
        "train_loss": state.train_loss,
        "heldout_loss": state.val_loss,
        "heldout_loss_base": base_loss,
        "examples": len(train_examples),
        "heldout_examples": len(heldout_examples),
        "rows": len(items),
        "trained_tokens_per_epoch": trained_tokens(train_examples),
        "epochs": state.tokens / (len(items) * model_cfg.seq_len) if cfg.packing else math.nan,
        "data": {"train": counts.to_manifest(), "heldout": heldout_counts.to_manifest()},
        "resumed_from_step": resumed_from,
        "timing": {"tokens_per_s": slot_tokens_per_s, "trained_tokens_per_s": slot_tokens_per_s * useful_share,
                   "peak_mem_mb": peak_memory_mb(trainer.device), "train_time_s": state.train_time_s},
    }
    if stop_after is not None and state.step < cfg.max_steps:
        return result
    trainer.save_release(out_dir, config, tracker)
    if main:
        held_prompts = [p for p in load_prompts(prompts, prompt_counts) if p.task and p.answer is not None]
        held_prompts = held_prompts[:cfg.eval_prompts]
        base_acc, _ = task_accuracy(load_release(Path(init_from).parent), encoder, held_prompts, cfg.max_new_tokens)
        acc, examples = task_accuracy(load_release(out_dir), encoder, held_prompts, cfg.max_new_tokens)
        result.update({"task_accuracy": acc, "task_accuracy_base": base_acc, "task_prompts": len(held_prompts),
                       "answer_examples": examples})
    return result


def sft_stage(ctx: StageContext, model_cfg: ModelSection, cfg: SFTSection) -> dict:
    """The registered stage: the pretrained weights, the run's tokenizer and the rows of `sft.data`
    (default: the instruct stage's), outputs in ctx.out_dir."""
    return run_sft(model_cfg, cfg, init_from=ctx.inputs["base"] / WEIGHTS, tokenizer_dir=ctx.inputs["tokenizer"],
                   data=as_paths(ctx.inputs["data"]), heldout=as_paths(ctx.inputs["heldout"]),
                   prompts=as_paths(ctx.inputs["prompts"]),
                   out_dir=ctx.out_dir, seed=ctx.seed, tracker=ctx.tracker)


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("sft")
