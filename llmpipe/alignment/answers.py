"""Greedy answers to prompts, their accuracy by the checker and their reward-model score: what
SFT's held-out task accuracy, PPO's rewards and evaluation share."""

from __future__ import annotations

import torch

from llmpipe.alignment.checker import check
from llmpipe.alignment.render import ChatEncoder, left_padded, score_batch, scores_at
from llmpipe.model.generate import generate
from llmpipe.model.model import Transformer
from llmpipe.tokenizer.special import PAD_ID


@torch.no_grad()
def greedy_responses(model: Transformer, encoder: ChatEncoder, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int = 16, temperature: float = 0.0,
                     generator: torch.Generator | None = None) -> list[list[int]]:
    """The reply ids to each encoded prompt, up to and including its end-of-turn (or cut off)."""
    device = model.tok_emb.weight.device
    responses = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start:start + batch_size], device)
        new = generate(model, ids, max_new_tokens, temperature=temperature, generator=generator,
                       stop_id=encoder.end, pad_id=PAD_ID, prompt_mask=mask)
        responses += [row[:row.index(encoder.end) + 1] if encoder.end in row else row for row in new.tolist()]
    return responses


def reply_text(encoder: ChatEncoder, response: list[int]) -> str:
    ids = response[:-1] if response and response[-1] == encoder.end else response
    return encoder.tokenizer.decode([t for t in ids if t != PAD_ID], skip_special_tokens=False)


def answer(model: Transformer, encoder: ChatEncoder, prompts: list[list[dict]], max_new_tokens: int,
           batch_size: int = 16, temperature: float = 0.0, generator: torch.Generator | None = None) -> list[str]:
    """The model's reply to each prompt (a message list), up to its end-of-turn, decoded."""
    responses = greedy_responses(model, encoder, [encoder.prompt(p) for p in prompts], max_new_tokens, batch_size,
                                 temperature, generator)
    return [reply_text(encoder, r) for r in responses]


@torch.no_grad()
def model_scores(reward_model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """The reward model's score of each whole conversation (prompt + response), at its last token."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = score_batch([p + r for p, r in pairs[start:start + batch_size]])
        device = next(reward_model.parameters()).device
        out += scores_at(reward_model(batch["input_ids"].to(device)), batch["last"].to(device)).float().cpu().tolist()
    return out


def task_accuracy(model: Transformer, encoder: ChatEncoder, prompts: list, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Share of prompts (with `task` and `answer`) whose greedy reply the checker accepts, and a few examples."""
    if not prompts:
        return float("nan"), []
    replies = answer(model, encoder, [p.prompt for p in prompts], max_new_tokens)
    right = [check(p.task, reply, p.answer) for p, reply in zip(prompts, replies)]
    examples = [{"prompt": p.prompt[-1]["content"], "reply": reply, "expected": p.answer, "correct": ok}
                for p, reply, ok in list(zip(prompts, replies, right))[:5]]
    return sum(right) / len(right), examples
