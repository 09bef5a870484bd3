"""An oracle no one here wrote: lm-evaluation-harness scores the same task folder on the exported
model, and its per-item acc, acc_norm and log-likelihoods are ours."""

from __future__ import annotations

import random

import pytest
import torch
from model_fixtures import MODEL, make_run_dir

from llmpipe import io
from llmpipe.config import ModelSection
from llmpipe.eval.multiple_choice import score_items
from llmpipe.eval.tasks import load_task, write_task
from llmpipe.export import export_hf
from llmpipe.model.model import Transformer
from llmpipe.model.release import load_release, save_release
from llmpipe.tokenizer.train import load_tokenizer

pytestmark = pytest.mark.slow

WORDS = "the quick brown fox jumps over lazy dog hello world model def return".split()


def toy_docs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        choices = sorted({" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(4)})
        docs.append({"question": " ".join(rng.choices(WORDS, k=rng.randint(3, 10))), "choices": choices,
                     "label": rng.randrange(len(choices))})
    return docs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random model with room for 2-shot contexts, as a completed pretrain stage, and its export."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("lm_eval") / "run")
    torch.manual_seed(0)
    folder = run_dir / "pretrain"
    save_release(Transformer(ModelSection(**{**MODEL, "seq_len": 160})), folder)
    files = {p.name: {"sha256": io.sha256_file(p), "bytes": p.stat().st_size} for p in folder.iterdir()}
    io.write_json(folder / "manifest.json", {"stage": "pretrain", "files": files, "fingerprint": "random"})
    return run_dir, export_hf(run_dir, "pretrain", run_dir.parent / "hf")


def run_lm_eval(export, task_dir, task: str, monkeypatch) -> list[dict]:
    """lm_eval --model hf --include_path TASK_DIR, from the task folder (it resolves data_files there)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(task_dir)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(task_dir.parent / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32,add_bos_token=True",
                              tasks=[task], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), batch_size=8,
                              device="cpu", log_samples=True)
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_and_our_scorer_agree_on_every_item(exported, tmp_path, monkeypatch):
    run_dir, export = exported
    task_dir = tmp_path / "toy_mc"
    yaml_path = write_task(task_dir, "toy_mc", toy_docs(24, 1), toy_docs(8, 2), doc_to_text="Q: {{question}}\nA:",
                           num_fewshot=2)
    theirs = run_lm_eval(export, task_dir, "toy_mc", monkeypatch)
    ours = score_items(load_release(run_dir / "pretrain"), load_tokenizer(run_dir / "tokenizer"),
                       load_task(yaml_path).items(seed=1234))
    assert len(theirs) == len(ours) == 24
    for sample, scored in zip(theirs, ours):
        assert sample["arguments"][0][0] == scored.item.context  # the same few-shot context, drawn the same way
        assert (sample["acc"], sample["acc_norm"]) == (scored.acc, scored.acc_norm)
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(scored.loglikelihoods, abs=1e-4)
    assert len({s.acc for s in ours}) == 2  # some right, some wrong: the comparison can fail
