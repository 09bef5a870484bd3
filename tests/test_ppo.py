"""PPO's pieces on a tiny CPU model: rollouts that do not depend on how rows are batched (so
not on the number of ranks), the rollout buffer's schedule and exact state, advantages of a
whole rollout batch, and the config checks."""

import json

import pytest
import torch
from model_fixtures import MODEL

from llmpipe.alignment.data import Prompt, Source
from llmpipe.alignment.ppo import RolloutBuffer, add_advantages, check_layout, collate_rollouts, sample_responses
from llmpipe.config import ModelSection, PPOSection
from llmpipe.errors import BadValue
from llmpipe.model.model import Transformer

STOP = 3


def _model():
    torch.manual_seed(0)
    return Transformer(ModelSection(**MODEL)).eval()


def test_a_sampled_response_does_not_depend_on_the_rows_batched_with_it():
    """Each row has its own generator: alone, in a batch of 4, or in another order, the same ids."""
    model, cfg = _model(), PPOSection(max_new_tokens=10, generation_batch_size=4)
    prompts = [[0, 5, 6], [0, 7], [0, 8, 9, 10, 11], [0, 12]]
    seeds = [11, 12, 13, 14]
    together = sample_responses(model, prompts, seeds, cfg, STOP)
    alone = [sample_responses(model, [p], [s], cfg, STOP)[0] for p, s in zip(prompts, seeds)]
    reordered = sample_responses(model, prompts[::-1], seeds[::-1], cfg, STOP)[::-1]
    assert together == alone == reordered
    assert sample_responses(model, prompts, [21, 22, 23, 24], cfg, STOP) != together  # the seed decides


def _prompts(n):
    return [Prompt(i, [{"role": "user", "content": f"q{i}"}], None, None, Source("p.jsonl", i + 1)) for i in range(n)]


class FakeRollouts:
    """Rows whose numbers name the rollout and prompt, counting the calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, index, prompts):
        self.calls.append((index, [p.index for p in prompts]))
        return [{"prompt": [0, 1], "response": [4 + p.index, STOP], "old_logp": [-1.0, -float(index)],
                 "advantages": [float(p.index), 0.5]} for p in prompts]


def test_the_rollout_buffer_serves_epochs_then_samples_the_next_batch_and_resumes_exactly():
    make = FakeRollouts()
    buffer = RolloutBuffer(_prompts(10), make, rollout_prompts=4, epochs=2, batch_size=2, seed=3)
    batches = [buffer.next_batch() for _ in range(3)]  # 2 epochs x 4 rows / 2 rows = 4 micro-batches a rollout
    assert [c[0] for c in make.calls] == [0]
    state = json.loads(json.dumps(buffer.state_dict()))  # what a checkpoint keeps (JSON)
    rest = [buffer.next_batch() for _ in range(5)]
    assert [c[0] for c in make.calls] == [0, 1]  # the 5th micro-batch is the first of rollout 1
    assert len(set(make.calls[0][1]) | set(make.calls[1][1])) == 8  # prompts in a seeded order, no repeats yet
    served = torch.cat([b["input_ids"] for b in batches + rest[:1]])[:, 2].tolist()
    assert sorted(served[:4]) == sorted(served[4:8]) == sorted(4 + i for i in make.calls[0][1])  # each epoch: every row once

    resumed_make = FakeRollouts()
    resumed = RolloutBuffer(_prompts(10), resumed_make, rollout_prompts=4, epochs=2, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    again = [resumed.next_batch() for _ in range(5)]
    assert resumed_make.calls == make.calls[1:]  # rollout 0 came from the state, not sampled again
    for a, b in zip(rest, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_split_every_step_of_the_buffer_as_one_process_serves_it():
    one = RolloutBuffer(_prompts(8), FakeRollouts(), rollout_prompts=4, epochs=1, batch_size=2, seed=5)
    ranks = [RolloutBuffer(_prompts(8), FakeRollouts(), rollout_prompts=4, epochs=1, batch_size=1, seed=5, rank=r,
                           world_size=2) for r in range(2)]
    for _ in range(4):
        whole = one.next_batch()["input_ids"][:, 2].tolist()
        split = [ids for rank in ranks for ids in rank.next_batch()["input_ids"][:, 2].tolist()]
        assert whole == split


def test_the_collated_batch_puts_each_token_number_at_its_input_position():
    rows = [{"prompt": [0, 1, 2], "response": [7, STOP], "advantages": [0.5, -1.0]},
            {"prompt": [0], "response": [8, 9, STOP], "advantages": [1.0, 2.0, 3.0]}]
    batch = collate_rollouts(rows)
    assert batch["targets"].tolist() == [[-1, -1, 7, STOP], [8, 9, STOP, -1]]
    assert batch["advantages"].tolist() == [[0, 0, 0.5, -1.0], [1.0, 2.0, 3.0, 0]]


def test_grpo_advantages_are_group_relative_and_zero_for_a_constant_group():
    rows = [{"response": [1] * n, "reward": r} for n, r in [(2, 1.0), (3, 0.0), (1, 1.0), (2, 1.0)]]
    add_advantages(rows, PPOSection(advantage="grpo", group_size=2))
    a = 0.5 / (2 ** -0.5 + 1e-4)  # (1 - 0.5) / (std of {1, 0} = 0.7071 + eps)
    assert rows[0]["advantages"] == pytest.approx([a, a]) and rows[1]["advantages"] == pytest.approx([-a] * 3)
    assert rows[2]["advantages"] == [0.0] and rows[3]["advantages"] == [0.0, 0.0]


def test_gae_advantages_are_whitened_over_the_whole_rollout_batch():
    rows = [{"response": [1] * n, "reward": r, "old_logp": [-1.0] * n, "ref_logp": [-1.2] * n, "values": [0.1] * n}
            for n, r in [(2, 1.0), (3, -1.0), (1, 0.5)]]
    add_advantages(rows, PPOSection(kl_coef=0.1))
    flat = torch.tensor([a for r in rows for a in r["advantages"]])
    assert flat.mean().item() == pytest.approx(0, abs=1e-6) and flat.std().item() == pytest.approx(1, abs=1e-4)
    assert all(len(r["returns"]) == len(r["response"]) for r in rows)


def test_layouts_that_do_not_divide_are_refused_naming_the_key():
    with pytest.raises(BadValue, match="ppo.group_size=1"):
        check_layout(PPOSection(advantage="grpo", group_size=1), rows_per_step=8, dp=1)
    with pytest.raises(BadValue, match="ppo.rollout_prompts=3 must be a multiple of the 2"):
        check_layout(PPOSection(rollout_prompts=3), rows_per_step=1, dp=2)
    with pytest.raises(BadValue, match="12 responses must be a multiple of the 8"):
        check_layout(PPOSection(rollout_prompts=12), rows_per_step=8, dp=1)
    check_layout(PPOSection(advantage="grpo", rollout_prompts=2), rows_per_step=16, dp=2)  # 2 x 8 = 16


def test_sampling_with_a_generator_per_row_follows_the_distribution():
    """Inverse-transform sampling: frequencies match the probabilities; top-p's dropped tokens never come."""
    from llmpipe.model.generate import sample_next

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]))[None].repeat(4000, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    counts = torch.bincount(sample_next(logits, generator=generators)[:, 0], minlength=5) / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.03)
    top = sample_next(logits, top_p=0.7, generator=generators)[:, 0]  # keeps 0.5 and 0.3
    assert set(top.tolist()) == {0, 1} and abs((top == 0).float().mean().item() - 0.5 / 0.8) < 0.03
