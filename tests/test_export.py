"""Export and generation, checked against an oracle no one here wrote: transformers' Llama."""

import json

import pytest
import torch
from model_fixtures import VOCAB, make_run_dir, run_config

from llmpipe import stages
from llmpipe.config import ModelSection
from llmpipe.export import export_hf
from llmpipe.generate import generate_text
from llmpipe.model import Transformer
from llmpipe.model.release import load_release, save_release


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("export") / "run")
    stages.execute("pretrain", run_config(run_dir, max_steps=4))
    return run_dir


def _hf_logits(folder, idx):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


def test_exported_folder_loads_in_transformers_and_matches_our_logits(trained_run, tmp_path):
    out = export_hf(trained_run, "pretrain", tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    ours = load_release(trained_run / "pretrain")
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)
    torch.testing.assert_close(_hf_logits(out, idx), expected, rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


@pytest.mark.parametrize("overrides", [{"tie_embeddings": False, "n_kv_heads": None, "rope_theta": 500_000.0}])
def test_untied_model_exports_too(tmp_path, overrides):
    from model_fixtures import MODEL

    from llmpipe.export import export_weights

    torch.manual_seed(0)
    model = Transformer(ModelSection(**{**MODEL, **overrides})).eval()
    save_release(model, tmp_path / "stage")
    export_weights(tmp_path / "stage", tmp_path / "hf")
    idx = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        expected = model(idx)
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", idx), expected, rtol=0, atol=1e-5)


def test_greedy_generation_matches_transformers(trained_run, tmp_path):
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    out = export_hf(trained_run, "pretrain", tmp_path / "hf")
    text = generate_text(trained_run, "pretrain", "hello world", max_new_tokens=12, temperature=0)
    tok = Tokenizer.from_file(str(trained_run / "tokenizer" / "tokenizer.json"))
    ids = torch.tensor([[0] + tok.encode("hello world", add_special_tokens=False).ids])
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_ids = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=1)[0, ids.shape[1]:].tolist()
    if 0 in hf_ids:
        hf_ids = hf_ids[:hf_ids.index(0)]
    assert text == tok.decode(hf_ids, skip_special_tokens=False)


def test_generation_is_seeded_and_validates_its_arguments(trained_run):
    a = generate_text(trained_run, "pretrain", "the quick", max_new_tokens=8, temperature=1.0, top_k=20, seed=1)
    b = generate_text(trained_run, "pretrain", "the quick", max_new_tokens=8, temperature=1.0, top_k=20, seed=1)
    assert a == b and isinstance(a, str)
    with pytest.raises(ValueError, match="top_p"):
        generate_text(trained_run, "pretrain", "x", top_p=1.5)


def test_export_refuses_an_unfinished_stage(tmp_path):
    with pytest.raises(stages.StageError, match="has not completed"):
        export_hf(tmp_path, "pretrain", tmp_path / "hf")
