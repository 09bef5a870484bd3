"""Sampling with the KV cache: the prompt is processed once, then one token per forward."""

from __future__ import annotations

import torch

from llmpipe.model.model import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V). temperature 0 = greedy (argmax)."""
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
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(model: Transformer, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             stop_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue the prompts idx (B, T) by up to max_new_tokens; returns only the new ids (B, N).

    The prompt is cropped on the left so prompt + completion fit the context. Generation stops
    early when every row has produced `stop_id` (which is included in the output).
    """
    model.eval()
    context = model.cfg.seq_len
    max_new_tokens = min(max_new_tokens, context - 1)
    idx = idx[:, -(context - max_new_tokens):]  # (B, T)
    cache = model.new_cache(idx.size(0), idx.size(1) + max_new_tokens) if use_cache else None
    out = []
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    seq = idx
    logits = model(idx, cache=cache)[:, -1, :]  # (B, V)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        out.append(nxt)
        if stop_id is not None:
            finished |= nxt[:, 0] == stop_id
            if bool(finished.all()):
                break
        if len(out) == max_new_tokens:
            break
        if cache is not None:
            logits = model(nxt, cache=cache)[:, -1, :]
        else:  # recompute the whole sequence: the reference the cache must agree with
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(seq)[:, -1, :]
    return torch.cat(out, dim=1) if out else idx[:, :0]
