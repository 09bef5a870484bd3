"""Export and generation, checked against an oracle no one here wrote: transformers' Llama."""

import json

import pytest
import torch
from model_fixtures import VOCAB, make_run_dir, run_config

from llmpipe import io, stages
from llmpipe.alignment.render import ChatEncoder
from llmpipe.config import ModelSection
from llmpipe.export import STOP_IDS, export_hf, export_tokenizer
from llmpipe.generate import generate_text, prompt_ids
from llmpipe.model import Transformer
from llmpipe.model.release import load_release, save_release
from llmpipe.tokenizer import chat, special
from llmpipe.tokenizer.train import load_tokenizer, save_tokenizer


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
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = export_hf(trained_run, "pretrain", tmp_path / "hf")
    text = generate_text(trained_run, "pretrain", "hello world", max_new_tokens=12, temperature=0)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok("hello world", return_tensors="pt")["input_ids"]  # the export puts the end-of-text first itself
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_ids = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=1)[0, ids.shape[1]:].tolist()
    if 0 in hf_ids:
        hf_ids = hf_ids[:hf_ids.index(0)]
    assert text == tok.decode(hf_ids, skip_special_tokens=False)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world 🎉"},
            {"role": "assistant", "content": "the quick brown fox"}, {"role": "user", "content": "def f(x): return x"}]


def _chat_template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)


def test_exported_chat_template_gives_the_ids_llmpipe_feeds_the_model(trained_run, tmp_path):
    from transformers import AutoTokenizer

    out = export_hf(trained_run, "pretrain", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = _chat_template_ids(hf, MESSAGES)
    assert ids == ChatEncoder(load_tokenizer(trained_run / "tokenizer")).prompt(MESSAGES)
    assert ids[0] == special.EOT_ID and ids.count(special.EOT_ID) == 1  # the template's, no BOS added on top
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == chat.render(MESSAGES, True)


@pytest.mark.parametrize("text", ["hello world", "def f(x): return x + 1", "", "🎉 naïve"])
def test_exported_tokenizer_feeds_plain_text_as_llmpipe_generate_does(trained_run, tmp_path, text):
    from transformers import AutoTokenizer

    out = export_hf(trained_run, "pretrain", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf(text)["input_ids"] == prompt_ids(load_tokenizer(trained_run / "tokenizer"), text)
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text
    assert hf(text, add_special_tokens=False)["input_ids"] == prompt_ids(load_tokenizer(trained_run / "tokenizer"), text)[1:]


def test_export_leaves_the_tokenizer_stage_alone_and_sets_generation_ends(trained_run, tmp_path):
    from transformers import GenerationConfig

    before = io.sha256_file(trained_run / "tokenizer" / "tokenizer.json")
    out = export_hf(trained_run, "pretrain", tmp_path / "hf")
    assert io.sha256_file(trained_run / "tokenizer" / "tokenizer.json") == before
    assert load_tokenizer(trained_run / "tokenizer").encode("hi").ids[0] != special.EOT_ID
    generation = GenerationConfig.from_pretrained(out, local_files_only=True)
    end_id = load_tokenizer(trained_run / "tokenizer").token_to_id(special.END_OF_TURN)
    assert generation.eos_token_id == STOP_IDS == [special.EOT_ID, end_id]
    assert generation.pad_token_id == special.PAD_ID and generation.top_k == 0 and generation.do_sample
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32


def test_a_tokenizer_stage_folder_exports_the_same_way(tmp_path):
    """The stage's own files (ByteLevel post-processor, full tokenizer_config) rather than the fixture's."""
    from model_fixtures import write_tokenizer
    from tokenizers import processors
    from transformers import AutoTokenizer

    folder = write_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(folder)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # as new_tokenizer() sets it
    save_tokenizer(tokenizer, folder)
    (tmp_path / "hf").mkdir()
    export_tokenizer(folder, tmp_path / "hf", model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert _chat_template_ids(hf, MESSAGES) == ChatEncoder(tokenizer).prompt(MESSAGES)
    assert hf("the lazy dog")["input_ids"] == prompt_ids(tokenizer, "the lazy dog")
    assert hf("the lazy dog", return_offsets_mapping=True)["offset_mapping"][1:] == \
        tokenizer.encode("the lazy dog", add_special_tokens=False).offsets


def test_generation_is_seeded_and_validates_its_arguments(trained_run):
    a = generate_text(trained_run, "pretrain", "the quick", max_new_tokens=8, temperature=1.0, top_k=20, seed=1)
    b = generate_text(trained_run, "pretrain", "the quick", max_new_tokens=8, temperature=1.0, top_k=20, seed=1)
    assert a == b and isinstance(a, str)
    with pytest.raises(ValueError, match="top_p"):
        generate_text(trained_run, "pretrain", "x", top_p=1.5)


def test_export_refuses_an_unfinished_stage(tmp_path):
    with pytest.raises(stages.StageError, match="has not completed"):
        export_hf(tmp_path, "pretrain", tmp_path / "hf")
