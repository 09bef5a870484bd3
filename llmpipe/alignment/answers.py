"""Greedy answers to prompts and their accuracy by the checker: SFT's held-out task accuracy, and
what evaluation and PPO's verifiable reward reuse."""

from __future__ import annotations

import torch

from llmpipe.alignment.checker import check
from llmpipe.alignment.render import ChatEncoder, left_padded
from llmpipe.model.generate import generate
from llmpipe.model.model import Transformer
from llmpipe.tokenizer.special import PAD_ID


@torch.no_grad()
def answer(model: Transformer, encoder: ChatEncoder, prompts: list[list[dict]], max_new_tokens: int,
           batch_size: int = 16, temperature: float = 0.0, generator: torch.Generator | None = None) -> list[str]:
    """The model's reply to each prompt (a message list), up to its end-of-turn, decoded."""
    device = model.tok_emb.weight.device
    replies = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded([encoder.prompt(p) for p in prompts[start:start + batch_size]], device)
        new = generate(model, ids, max_new_tokens, temperature=temperature, generator=generator,
                       stop_id=encoder.end, pad_id=PAD_ID, prompt_mask=mask)
        for row in new.tolist():
            if encoder.end in row:
                row = row[:row.index(encoder.end)]
            replies.append(encoder.tokenizer.decode([t for t in row if t != PAD_ID], skip_special_tokens=False))
    return replies


def task_accuracy(model: Transformer, encoder: ChatEncoder, prompts: list, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Share of prompts (with `task` and `answer`) whose greedy reply the checker accepts, and a few examples."""
    if not prompts:
        return float("nan"), []
    replies = answer(model, encoder, [p.prompt for p in prompts], max_new_tokens)
    right = [check(p.task, reply, p.answer) for p, reply in zip(prompts, replies)]
    examples = [{"prompt": p.prompt[-1]["content"], "reply": reply, "expected": p.answer, "correct": ok}
                for p, reply, ok in list(zip(prompts, replies, right))[:5]]
    return sum(right) / len(right), examples
