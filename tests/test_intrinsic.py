"""Bits per byte on hand-computed cases: token byte lengths against decoded UTF-8, a model that
knows nothing (uniform logits), and the unigram baseline."""

import math

import numpy as np
import pytest
import torch
from model_fixtures import write_tokenizer

from llmpipe.eval.intrinsic import bits_per_byte, heldout_metrics, token_byte_lengths, unigram_bpb
from llmpipe.tokenizer.special import EOT_ID
from llmpipe.tokenizer.train import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_the_byte_lengths_of_a_streams_tokens_sum_to_its_utf8_bytes(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    for text in ["plain ascii text", "naïve café — ✓ 数据", "def f(x):\n    return x ** 2\n"]:
        ids = [EOT_ID] + tokenizer.encode(text, add_special_tokens=False).ids  # the end-of-text counts 0
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[EOT_ID] == 0


class Uniform(torch.nn.Module):
    """Knows nothing: the same logits everywhere, so every token costs ln V nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab) + self.dummy


def test_a_uniform_model_costs_log2_v_bits_per_token():
    lengths = np.array([0, 1, 2, 3, 1, 1])  # id 0 is special
    stream = np.array([0, 1, 2, 3, 0, 4, 5, 2])  # predicted: 1 2 3 0 4 5 2 (the 0 is not scored)
    metrics = heldout_metrics(Uniform(6), [stream], seq_len=3, byte_lengths=lengths)
    # windows of 4: [0 1 2 3] [3 0 4 5] [5 2]: scored targets 1 2 3 | 4 5 | 2 -> 6 tokens, 1+2+3+1+1+2 = 10 bytes
    assert metrics["tokens"] == 6 and metrics["bytes"] == 10
    assert metrics["loss"] == pytest.approx(math.log(6)) and metrics["perplexity"] == pytest.approx(6)
    assert metrics["bpb"] == pytest.approx(6 * math.log2(6) / 10)


def test_the_unigram_baseline_is_add_one_smoothed_over_text_tokens():
    lengths = np.array([0, 1, 2])
    train = [np.array([0, 1, 1, 1, 2, 0])]  # text counts 3 and 1, +1 each: p = 4/6, 2/6
    heldout = [np.array([1, 2, 0, 2])]
    expected = -(math.log(4 / 6) + 2 * math.log(2 / 6)) / math.log(2) / (1 + 2 + 2)
    assert unigram_bpb(train, heldout, lengths) == pytest.approx(expected)
    assert bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)
