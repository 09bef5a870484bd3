"""The tokenizer stage: exact byte-level round trip, special ids, transformers + chat template."""

from __future__ import annotations

import json
import random

import pytest

from llmpipe import stages
from llmpipe.config import validate
from llmpipe.tokenizer import chat, special
from llmpipe.tokenizer.train import load_tokenizer, train_tokenizer

TRICKY = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tinside\t\tand\tat end\t",
    "line one\nline two\r\nwindows\rold mac\n\n\nblank lines\n",
    "naïve café résumé — “quotes” ‘single’ … ½ ∑ √",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 🎉👩‍👩‍👧‍👦🏳️‍🌈 and skin 👍🏽",
    "zero\u200bwidth\u00a0nbsp\ufeffbom",
    "combining e\u0301 vs é, ﬁ ligature, Ａ fullwidth",
    "def f(x):\n    return x ** 2  # comment\n",
    " ",
    "\n",
    "a" * 500,
    "literal <|endoftext|> and <|user|> in text",
    "mixed\t \n \t\n   ",
    "",
]


def corpus(n: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "model", "token", "data", "shard", "naïve", "東京", "🎉", "def", "return", "x = 1",
             "\t", "\n", "  ", "Hello", "world", "pipeline", "über", "ß", "€100"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(n)]


def write_docs(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tokenizer stage run through the executor on a small generated corpus."""
    root = tmp_path_factory.mktemp("tok")
    docs = write_docs(root / "docs", corpus())
    config = validate({"run": {"run_dir": str(root / "run")},
                       "tokenizer": {"vocab_size": 400, "min_frequency": 2, "input": str(docs)}})
    manifest = stages.execute("tokenizer", config).manifest
    return root / "run" / "tokenizer", manifest


def test_stage_writes_the_tokenizer_files(trained):
    folder, manifest = trained
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(manifest["files"])
    assert manifest["counts"]["documents"] == 150
    assert manifest["counts"]["skipped_documents"] == 0
    assert manifest["counts"]["vocab_size"] == load_tokenizer(folder).get_vocab_size() <= 400
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(trained, text):
    tokenizer = load_tokenizer(trained[0])
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_round_trip_with_special_tokens_as_text(trained):
    tokenizer = load_tokenizer(trained[0])
    tokenizer.encode_special_tokens = True  # how the shard stage encodes documents
    for text in TRICKY:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert special.EOT_ID not in ids  # EOT never comes from a document's text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_in_order(trained):
    tokenizer = load_tokenizer(trained[0])
    assert special.EOT_ID == 0 and special.PAD_ID == 1
    for i, token in enumerate(special.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i
        assert tokenizer.encode(token, add_special_tokens=False).ids == [i]
    ids = tokenizer.encode(f"hi{special.USER}there{special.END_OF_TURN}", add_special_tokens=False).ids
    assert tokenizer.token_to_id(special.USER) in ids and tokenizer.token_to_id(special.END_OF_TURN) in ids


def test_training_is_deterministic():
    texts = corpus(60, seed=3)
    assert train_tokenizer(texts, 350).to_str() == train_tokenizer(texts, 350).to_str()


def test_transformers_loads_offline_and_applies_the_chat_template(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained[0]), local_files_only=True)
    assert hf.eos_token == special.EOT and hf.eos_token_id == 0
    assert hf.pad_token_id == special.PAD_ID
    for text in TRICKY:
        assert hf.decode(hf.encode(text, add_special_tokens=False), skip_special_tokens=False) == text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🎉"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat.render(messages, add_generation_prompt=True)
    assert text == ("<|endoftext|><|system|>Be brief.<|end|><|user|>Hi 🎉<|end|><|assistant|>Hello.<|end|>"
                    "<|user|>Bye<|end|><|assistant|>")
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
    role_ids = [hf.convert_tokens_to_ids(t) for t in (special.SYSTEM, special.USER, special.ASSISTANT)]
    end_id = hf.convert_tokens_to_ids(special.END_OF_TURN)
    assert [i for i in ids if i in role_ids] == [role_ids[0], role_ids[1], role_ids[2], role_ids[1], role_ids[2]]
    assert ids.count(end_id) == 4 and ids[-1] == role_ids[2]
    no_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("<|end|>")
