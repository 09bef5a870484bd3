"""Multiple-choice tasks: lm-eval's task format, the few-shot sampler and log-likelihood scoring."""

from __future__ import annotations

import math
import random

import pytest
import torch
from model_fixtures import MODEL, write_tokenizer

from llmpipe.config import ModelSection
from llmpipe.eval.multiple_choice import encode, encode_pair, mean_stderr, score_items, task_metrics
from llmpipe.eval.tasks import TaskError, load_task, write_task
from llmpipe.model.model import Transformer
from llmpipe.tokenizer.train import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelSection(**{**MODEL, "seq_len": 160})).eval()


def _docs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog hello world model".split()
    return [{"question": " ".join(rng.choices(words, k=rng.randint(2, 9))),
             "choices": [" ".join(rng.choices(words, k=rng.randint(1, 4))) for _ in range(rng.randint(2, 4))],
             "label": 0} for _ in range(n)]


@pytest.fixture
def task(tmp_path):
    return load_task(write_task(tmp_path / "t", "toy", _docs(12, 1), _docs(6, 2),
                                doc_to_text="Q: {{question}}\nA:", num_fewshot=2))


def test_fewshot_contexts_are_lm_evals(task):
    """The few-shot sampler is one seeded Random drawing for each doc in order, as lm-eval's."""
    rng = random.Random(1234)
    for item in task.items(seed=1234):
        shots = rng.sample(task.fewshot_docs, 2)
        expected = "".join(f"Q: {s['question']}\nA: {s['choices'][s['label']]}\n\n" for s in shots)
        assert item.context == expected + f"Q: {item.doc['question']}\nA:"
    assert [i.context for i in task.items(seed=1)] != [i.context for i in task.items(seed=1234)]


def test_choice_loglikelihood_is_the_sum_of_its_token_logprobs(task, model, tokenizer):
    """Batched, sorted, context computed once: equal to one full forward per choice."""
    items = task.items(seed=1234)
    scored = score_items(model, tokenizer, items, batch_size=5)
    for s in scored:
        for choice, ll in zip(s.item.choices, s.loglikelihoods):
            context, cont = encode_pair(tokenizer, s.item.context, " " + choice)
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = model(ids[:, :-1]).log_softmax(-1)[0]
            direct = sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cont))
            assert ll == pytest.approx(direct, abs=1e-4)
    assert score_items(model, tokenizer, items, batch_size=1)[3].loglikelihoods == \
        pytest.approx(scored[3].loglikelihoods, abs=1e-5)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(tokenizer):
    context, cont = encode_pair(tokenizer, "hello world ", "model")
    assert context == encode(tokenizer, "hello world")
    assert context + cont == encode(tokenizer, "hello world model")


def test_acc_acc_norm_and_stderr(task, model, tokenizer):
    scored = score_items(model, tokenizer, task.items())
    metrics = task_metrics(scored, flagged={0, 1})
    acc = [float(max(range(len(s.loglikelihoods)), key=lambda k: (s.loglikelihoods[k], -k)) == s.item.gold)
           for s in scored]
    assert metrics["acc"] == sum(acc) / len(acc)
    norm = [s.acc_norm for s in scored]
    assert metrics["acc_norm"] == sum(norm) / len(norm)
    mean = sum(acc) / len(acc)
    assert metrics["stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)))
    assert (metrics["n"], metrics["n_contaminated"], metrics["n_clean"]) == (12, 2, 10)
    assert metrics["acc_clean"] == sum(acc[2:]) / 10
    assert math.isnan(mean_stderr([1.0]))


def test_a_task_file_lm_eval_would_run_differently_is_refused(tmp_path, task):
    text = task.path.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("output_type: multiple_choice", "output_type: generate_until"))
    with pytest.raises(TaskError, match="output_type='generate_until': allowed values: multiple_choice"):
        load_task(bad)
    bad.write_text(text + "filter_list: []\n")
    with pytest.raises(TaskError, match="key filter_list is not supported"):
        load_task(bad)
