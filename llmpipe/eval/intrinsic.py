"""Intrinsic evaluation: loss, perplexity and bits per byte of a language model on held-out tokens.

Bits per byte compare models with different tokenizers: the summed negative log-likelihood
(nats) of every predicted token, over the UTF-8 bytes those tokens decode to, divided by ln 2.
Special tokens (end-of-text, chat roles) are neither scored nor counted: they decode to no
text. With a byte-level BPE every character of a token's string is one byte, so a token's
byte length is the length of its string and the bytes of a stream are the sum of its tokens'.

The baseline is a unigram model of the training tokens (add-one smoothed), scored the same way:
what a model that ignores context achieves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llmpipe.tokenizer.special import SPECIAL_TOKENS


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to (V,), 0 for special tokens."""
    vocab = tokenizer.get_vocab_size()
    lengths = np.zeros(vocab, dtype=np.int64)
    specials = set(SPECIAL_TOKENS)
    for token_id in range(vocab):
        token = tokenizer.id_to_token(token_id)
        if token is not None and token not in specials:
            lengths[token_id] = len(token)  # byte-level BPE: one character per byte
    return lengths


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / n_bytes if n_bytes else math.nan


def unigram_bpb(train: list[np.ndarray], heldout: list[np.ndarray], byte_lengths: np.ndarray) -> float:
    """Bits per byte of the add-one-smoothed unigram model of `train` on every text token of `heldout`."""
    vocab = len(byte_lengths)
    counts = np.ones(vocab, dtype=np.float64)
    for stream in train:
        counts += np.bincount(stream, minlength=vocab)[:vocab]
    text = byte_lengths > 0
    counts[~text] = 0  # special tokens are never scored, so they take no probability either
    log_p = np.log(counts / counts.sum(), where=text, out=np.zeros(vocab))
    tokens = np.concatenate(heldout)
    scored = tokens[text[tokens]]
    return bits_per_byte(float(-log_p[scored].sum()), int(byte_lengths[scored].sum()))


@torch.no_grad()
def heldout_metrics(model: torch.nn.Module, heldout: list[np.ndarray], seq_len: int, byte_lengths: np.ndarray,
                    batch_size: int = 8) -> dict[str, float]:
    """Loss (nats per text token), perplexity and bits per byte of `model` on `heldout`: each
    stream cut into windows of seq_len + 1 tokens (the last partial one included), every token
    after a window's first predicted from the tokens before it in the window."""
    device = next(model.parameters()).device
    lengths = torch.as_tensor(byte_lengths, device=device)
    windows = [stream[start:start + seq_len + 1] for stream in heldout
               for start in range(0, max(1, len(stream) - 1), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.tensor(np.stack([np.pad(w.astype(np.int64), (0, width - len(w))) for w in chunk]), device=device)
        real = torch.tensor([[i < len(w) for i in range(width)] for w in chunk], device=device)
        logits = model(ids[:, :-1]).float()  # (B, T, V)
        targets = ids[:, 1:]
        token_nats = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
        scored = real[:, 1:] & (lengths[targets] > 0)
        nats += float(token_nats[scored].sum())
        n_tokens += int(scored.sum())
        n_bytes += int(lengths[targets][scored].sum())
    loss = nats / n_tokens if n_tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": bits_per_byte(nats, n_bytes),
            "tokens": n_tokens, "bytes": n_bytes}
