"""Sampling with the KV cache: the prompt is processed once, then one token per forward."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from llmpipe.model.model import Transformer

Generators = torch.Generator | list[torch.Generator] | None


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: Generators = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V). temperature 0 = greedy (argmax).
    `generator`: one for the batch, or one per row, so that a row's sample does not depend on
    which rows share its batch (RL rollouts, the same on any number of ranks)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the top one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        # inverse-transform sampling: one uniform from each row's generator, then one batched search
        # of the cumulative probabilities (a multinomial call per row costs 50x more at batch 16)
        u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generator])  # (B,)
        cdf = probs.cumsum(dim=-1)  # (B, V)
        nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # first token whose cdf exceeds u
        return nxt.clamp(max=probs.size(-1) - 1)  # (B, 1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def _in_inference_mode(fn):
    """Run `fn` under `torch.inference_mode()` and return an ordinary copy of its tensor: an
    inference tensor could never take part in autograd later."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone()

    return wrapper


@_in_inference_mode
def generate(model: Transformer, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: Generators = None,
             stop_id: int | None = None, use_cache: bool = True, prompt_mask: torch.Tensor | None = None,
             pad_id: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue the prompts idx (B, T) by up to max_new_tokens; returns only the new ids (B, N).

    Prompts of different lengths come left-padded with `prompt_mask` (B, T) True on real tokens:
    each row then gets its own positions (from 0 at its first real token) and never attends to
    its padding, as transformers' `generate` does with an attention mask. The prompt is cropped
    on the left so prompt + completion fit the context. A row that produced `stop_id` (included
    in its output) is filled with `pad_id` (default `stop_id`) after it; generation ends when
    every row has stopped. `on_token(ids (B, 1))` sees each new token as it is made (streaming).

    Runs in inference mode (no autograd bookkeeping at all: a tenth off a tiny model's step on
    CPU); the ids come back as an ordinary tensor, which training on rollouts can use.
    """
    model.eval()
    context = model.cfg.seq_len
    max_new_tokens = min(max_new_tokens, context - 1)
    idx = idx[:, -(context - max_new_tokens):]  # (B, T)
    B, T = idx.shape
    positions = segments = step_positions = step_segments = None
    if prompt_mask is not None:
        prompt_mask = prompt_mask[:, -T:].to(idx.device)
        segments = prompt_mask.long()  # padding is segment 0, the prompt and its continuation 1
        positions = (segments.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        # the i-th new token's position and segment, made once rather than grown every step
        step_positions = positions[:, -1:] + torch.arange(1, max_new_tokens + 1, device=idx.device)  # (B, N)
        step_segments = torch.ones(B, 1, dtype=torch.long, device=idx.device)
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    fill = stop_id if pad_id is None else pad_id
    out = []
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    seq = idx
    logits = model(idx, cache=cache, positions=positions, segments=segments, last_only=True)[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if stop_id is not None:
            nxt = torch.where(finished[:, None], torch.full_like(nxt, fill), nxt)
            finished |= nxt[:, 0] == stop_id
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if (stop_id is not None and bool(finished.all())) or len(out) == max_new_tokens:
            break
        if cache is not None:
            step_pos = None if positions is None else step_positions[:, step:step + 1]
            logits = model(nxt, cache=cache, positions=step_pos, segments=step_segments, last_only=True)[:, -1]
        else:  # recompute the whole sequence: the reference the cache must agree with
            seq = torch.cat([seq, nxt], dim=1)
            if positions is not None:
                positions = torch.cat([positions, step_positions[:, step:step + 1]], dim=1)
                segments = torch.cat([segments, step_segments], dim=1)
            logits = model(seq, positions=positions, segments=segments, last_only=True)[:, -1]
    return torch.cat(out, dim=1) if out else idx[:, :0]
