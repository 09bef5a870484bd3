"""Rendering, loss masks, packing and completion log-probs: the code every post-training stage shares."""

import math

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import write_tokenizer

from llmpipe.alignment.dpo import dpo_loss, dpo_step_fn
from llmpipe.alignment.render import (
    ChatEncoder,
    completion_batch,
    completion_logps,
    last_real_position,
    model_inputs,
    pack,
    padded,
    score_batch,
    scores_at,
    stack_rows,
)
from llmpipe.alignment.reward import reward_loss
from llmpipe.config import DPOSection, ModelSection
from llmpipe.model.model import Transformer
from llmpipe.tokenizer import chat
from llmpipe.tokenizer.train import load_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "the lazy dog"}]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return ChatEncoder(load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok"))))


def _model(seed=0, head="lm"):
    torch.manual_seed(seed)
    return Transformer(ModelSection(vocab_size=320, d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=64), head=head)


def test_turn_by_turn_ids_are_the_rendered_string_encoded(encoder):
    encoded = encoder.conversation(CONVERSATION)
    assert encoded.ids == encoder.tokenizer.encode(chat.render(CONVERSATION), add_special_tokens=False).ids
    prompt = encoder.prompt(CONVERSATION[:2])
    assert prompt == encoder.tokenizer.encode(chat.render(CONVERSATION[:2], add_generation_prompt=True),
                                              add_special_tokens=False).ids


def test_only_assistant_content_and_its_end_of_turn_are_trained(encoder):
    encoded = encoder.conversation(CONVERSATION)
    trained = [encoder.tokenizer.id_to_token(i) for i, keep in zip(encoded.ids, encoded.trained) if keep]
    text = encoder.tokenizer.decode([i for i, keep in zip(encoded.ids, encoded.trained) if keep],
                                    skip_special_tokens=False)
    assert text == "the quick fox<|end|>the lazy dog<|end|>"
    assert trained.count("<|end|>") == 2 and "<|assistant|>" not in trained and "<|user|>" not in trained
    assert encoded.ids[0] == encoder.eot and not encoded.trained[0]


def test_a_packed_batch_has_the_token_weighted_loss_of_its_examples(encoder):
    model = _model()
    texts = ["the quick brown fox", "hello", "def f(x): return x + 1 and the lazy dog", "hello world"]
    examples = [encoder.conversation([{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}])
                for t in texts]
    rows = pack(examples, 64)
    assert len(rows) < len(examples)
    batch = stack_rows(rows)
    packed_loss = model(batch["input_ids"], batch["targets"], **model_inputs(batch))
    total, count = 0.0, 0
    for example in examples:  # one by one, no padding at all
        one = padded([example])
        n = int((one["targets"] != -1).sum())
        total += model(one["input_ids"], one["targets"]).item() * n
        count += n
    assert abs(packed_loss.item() - total / count) < 1e-5


def test_completion_logp_counts_the_tokens_after_the_generation_prompt(encoder):
    model = _model(1).eval()
    prompt = [{"role": "user", "content": "hello world"}]
    head, tail = encoder.prompt_completion(prompt, [{"role": "assistant", "content": "the lazy dog"}])
    assert tail[-1] == encoder.end and head[-1] == encoder.role["assistant"]
    batch = completion_batch([(head, tail), (head[:2] + head[-1:], tail[:3])])  # two lengths: padding
    with torch.no_grad():
        got = completion_logps(model, batch)
        logits = model(torch.tensor([head + tail]))[0]  # by the formula: sum log p(tail_i | head, tail_<i)
    logp = F.log_softmax(logits.float(), dim=-1)
    expected = sum(float(logp[len(head) - 1 + i, t]) for i, t in enumerate(tail))
    assert abs(float(got[0]) - expected) < 1e-4


def test_dpo_and_ipo_losses_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.1
    losses, metrics = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    for i in range(6):
        margin = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        assert abs(float(losses[i]) - math.log1p(math.exp(-beta * margin))) < 1e-6
    assert abs(float(metrics["rewards/chosen"]) - beta * float((pc - rc).mean())) < 1e-6
    accuracy = sum(float(pc[i] - rc[i]) > float(pr[i] - rr[i]) for i in range(6)) / 6
    assert abs(float(metrics["rewards/accuracies"]) - accuracy) < 1e-6
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    for i in range(6):
        margin = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        assert abs(float(ipo[i]) - (margin - 1 / (2 * beta)) ** 2) < 1e-6


def test_the_dpo_loss_starts_at_log_2_against_itself_as_reference(encoder):
    """Policy = reference: every margin is 0, the sigmoid loss is log 2 whether the reference is
    cached in the batch or computed by the same model in the step."""
    model = _model(2).eval()
    prompt = [{"role": "user", "content": "hello"}]
    pairs = [encoder.prompt_completion(prompt, [{"role": "assistant", "content": c}]) for c in ("the fox", "a dog")]
    batch = completion_batch(pairs)
    with torch.no_grad():
        ref = completion_logps(model, batch)
        batch.update(ref_chosen=ref[:1], ref_rejected=ref[1:])
        cached, _ = dpo_step_fn(DPOSection(beta=0.1))(model, batch)
        forward, _ = dpo_step_fn(DPOSection(beta=0.1), reference=model)(model, batch)
    assert abs(float(cached) - math.log(2)) < 1e-6 and abs(float(forward) - math.log(2)) < 1e-6


def test_the_reward_loss_equals_its_formula():
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    loss, metrics = reward_loss(chosen, rejected, center_coef=0.01)
    pairs = list(zip(chosen.tolist(), rejected.tolist()))
    bradley_terry = sum(math.log(1 + math.exp(-(c - r))) for c, r in pairs) / 3  # -log sigmoid(c - r)
    center = sum((c + r) ** 2 for c, r in pairs) / 3
    assert abs(loss.item() - (bradley_terry + 0.01 * center)) < 1e-6
    assert abs(reward_loss(chosen, rejected)[0].item() - bradley_terry) < 1e-6
    assert metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)  # a tie is no win
    assert metrics["rewards/margins"].item() == pytest.approx(sum(c - r for c, r in pairs) / 3)


def test_a_score_is_read_at_the_last_real_token_with_padding_on_either_side():
    model = _model(head="score").eval()
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(7, 320, (n,), generator=g).tolist() for n in (9, 4, 6)]
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in sequences])  # (3,)
        right = score_batch(sequences)  # right padding: plain causal attention is exact
        assert torch.equal(right["last"], last_real_position(right["input_ids"] != 1))
        right_scores = scores_at(model(right["input_ids"]), right["last"])
        # left padding, as rollouts come: per-row positions and segments keep the padding out
        width = max(map(len, sequences))
        mask = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in sequences])
        ids = torch.tensor([[1] * (width - len(s)) + s for s in sequences])
        segments = mask.long()
        positions = (segments.cumsum(1) - 1).clamp(min=0)
        left_scores = scores_at(model(ids, positions=positions, segments=segments), last_real_position(mask))
    assert last_real_position(mask).tolist() == [width - 1] * 3
    torch.testing.assert_close(right_scores, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left_scores, alone, rtol=0, atol=1e-5)
