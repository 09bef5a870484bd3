"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores it.

Each choice is a request (context, target_delimiter + choice), tokenized as lm-eval's
`_encode_pair` does: trailing spaces of the context move to the continuation, the pair is encoded
whole and the continuation is what follows the context's own encoding. Its log-likelihood is the
sum of the continuation tokens' log-probabilities after context + the tokens before them.

  acc       the choice with the highest summed log-likelihood is the gold one
  acc_norm  the same after dividing by the choice's length in characters (lm-eval's acc_norm)
  stderr    sample standard deviation / sqrt(n), as lm-eval's mean_stderr

Requests run in batches of contexts sorted by length, longest first; a context is computed once
for all its choices: its keys and values are cached (left-padded, so every context ends in the
same slot) and each choice continues from them with its own positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from llmpipe.eval.tasks import Item
from llmpipe.model.model import Transformer
from llmpipe.tokenizer.special import EOT_ID, PAD_ID


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` after the end-of-text token that starts every document (and the
    exported tokenizer's encoding with `add_special_tokens`: lm-eval's `add_bos_token=True`)."""
    return [EOT_ID, *tokenizer.encode(text, add_special_tokens=False).ids]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


@dataclass(frozen=True)
class Scored:
    """One item's outcome: per-choice log-likelihoods, whether each continuation is the greedy one."""

    item: Item
    loglikelihoods: list[float]
    greedy: list[bool]

    @property
    def acc(self) -> float:
        return float(int(np.argmax(self.loglikelihoods)) == self.item.gold)

    @property
    def acc_norm(self) -> float:
        lengths = np.array([float(len(c)) for c in self.item.choices])
        return float(int(np.argmax(np.array(self.loglikelihoods) / lengths)) == self.item.gold)


def _batches(order: list[int], groups: list[tuple[list[int], list[list[int]]]], batch_size: int,
             seq_len: int) -> list[list[int]]:
    """Consecutive runs of `order` of at most `batch_size` contexts whose longest context plus longest
    continuation (less its last token, never an input) fit the context length."""
    batches: list[list[int]] = []
    width = cont_width = 0
    for i in order:
        context, continuations = groups[i]
        w, c = max(width, len(context)), max(cont_width, max(map(len, continuations)))
        if batches and len(batches[-1]) < batch_size and w + c - 1 <= seq_len:
            batches[-1].append(i)
            width, cont_width = w, c
        else:
            batches.append([i])
            width, cont_width = len(context), max(map(len, continuations))
    return batches


@torch.no_grad()
def loglikelihoods(model: Transformer, groups: list[tuple[list[int], list[list[int]]]],
                   batch_size: int = 32) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids, ...]): each continuation's summed log-prob and
    whether every one of its tokens is the argmax. A context is run once for all its continuations;
    one too long for the model loses its first tokens (lm-eval truncates on the left too)."""
    device = model.tok_emb.weight.device
    seq_len = model.cfg.seq_len
    trimmed = [(context[-max(1, seq_len + 1 - max(map(len, conts))):], conts) for context, conts in groups]
    order = sorted(range(len(groups)), key=lambda i: (-len(trimmed[i][0]) - max(map(len, trimmed[i][1])), i))
    results: list = [None] * len(groups)
    for batch in _batches(order, trimmed, batch_size, seq_len):
        contexts = [trimmed[i][0] for i in batch]
        conts = [c for i in batch for c in trimmed[i][1]]
        owner = torch.tensor([row for row, i in enumerate(batch) for _ in trimmed[i][1]], device=device)
        width, cont_width = max(map(len, contexts)), max(map(len, conts))
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        segments = torch.zeros(len(batch), width, dtype=torch.long)  # 0: left padding, 1: text
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context)
            segments[row, width - len(context):] = 1
            positions[row, width - len(context):] = torch.arange(len(context))
        cache = model.new_cache(len(batch), width + cont_width - 1)
        last = model(ids.to(device), cache=cache, positions=positions.to(device), segments=segments.to(device),
                     last_only=True)[:, 0].float().log_softmax(-1)  # (B, V): each first continuation token's
        cont_ids = torch.full((len(conts), cont_width), PAD_ID, dtype=torch.long, device=device)
        for row, cont in enumerate(conts):
            cont_ids[row, :len(cont)] = torch.tensor(cont)
        logps = last[owner][:, None]  # (R, 1, V)
        if cont_width > 1:  # the rest: each continuation a row continuing its context's cached keys and values
            cache.k = [k[owner] for k in cache.k]
            cache.v = [v[owner] for v in cache.v]
            cache.segments = cache.segments[owner]
            lengths = torch.tensor([len(c) for c in contexts], device=device)[owner]
            cont_positions = (lengths[:, None] + torch.arange(cont_width - 1, device=device)).clamp(max=seq_len - 1)
            rest = model(cont_ids[:, :-1], cache=cache, positions=cont_positions,
                         segments=torch.ones_like(cont_ids[:, :-1])).float().log_softmax(-1)  # (R, W-1, V)
            logps = torch.cat([logps, rest], dim=1)  # (R, W, V): row j predicts continuation token j
        token_logps = logps.gather(-1, cont_ids[..., None])[..., 0]  # (R, W)
        real = torch.arange(cont_width, device=device)[None] < torch.tensor([len(c) for c in conts], device=device)[:, None]
        sums = (token_logps * real).sum(-1).tolist()
        greedy = ((logps.argmax(-1) == cont_ids) | ~real).all(-1).tolist()
        row = 0
        for i in batch:
            n = len(trimmed[i][1])
            results[i] = list(zip(sums[row:row + n], greedy[row:row + n]))
            row += n
    return results


def score_items(model: Transformer, tokenizer: Tokenizer, items: list[Item], batch_size: int = 32) -> list[Scored]:
    groups = []
    for item in items:
        pairs = [encode_pair(tokenizer, item.context, item.delimiter + choice) for choice in item.choices]
        # trailing spaces of the context move to the continuation, so every pair has the same context ids
        groups.append((pairs[0][0], [cont for _, cont in pairs]))
    outcomes = loglikelihoods(model, groups, batch_size)
    return [Scored(item, [ll for ll, _ in out], [g for _, g in out]) for item, out in zip(items, outcomes)]


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def task_metrics(scored: list[Scored], flagged: set[int] | None = None) -> dict:
    """acc, acc_norm, stderr (of acc), n; without the flagged doc ids too, when some are flagged."""
    def of(rows: list[Scored]) -> dict:
        acc, norm = [s.acc for s in rows], [s.acc_norm for s in rows]
        n = len(rows)
        return {"acc": sum(acc) / n if n else math.nan, "acc_norm": sum(norm) / n if n else math.nan,
                "stderr": mean_stderr(acc), "acc_norm_stderr": mean_stderr(norm), "n": n}

    result = of(scored)
    flagged = flagged or set()
    result["n_contaminated"] = sum(s.item.doc_id in flagged for s in scored)
    clean = of([s for s in scored if s.item.doc_id not in flagged])
    result.update({"acc_clean": clean["acc"], "acc_norm_clean": clean["acc_norm"], "n_clean": clean["n"]})
    return result


def chance(items: list[Item]) -> float:
    """Expected acc of a uniform guess: the mean of 1 / number of choices."""
    return sum(1 / len(i.choices) for i in items) / len(items) if items else math.nan
