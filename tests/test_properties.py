"""Property-based tests (hypothesis): random text, tokens, conversations and configs into the
tokenizer, shard, chat-rendering and config code. Derandomized, so every run tries the same
examples: a failure here reproduces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe import config as configlib
from llmpipe.alignment.render import ChatEncoder
from llmpipe.config import ConfigError, RunConfig, Section
from llmpipe.data.shards import read_tokens, write_shard
from llmpipe.tokenizer.chat import render
from llmpipe.tokenizer.special import SPECIAL_TOKENS, ordinary
from llmpipe.tokenizer.train import train_tokenizer

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# text as documents and chat messages have it: any characters, and now and then a special-token string
TEXT = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TOKENS)), max_size=6).map("".join)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1\n", "naïve café 東京 😀"]
    return train_tokenizer(texts * 20, vocab_size=300)


@PROPERTY
@given(text=TEXT)
def test_any_text_encodes_to_ordinary_tokens_and_decodes_to_itself(tokenizer, text):
    ids = ordinary(tokenizer).encode(text, add_special_tokens=False).ids
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))  # "<|end|>" in a document is text, not a turn's end
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@PROPERTY
@given(messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": TEXT}), max_size=5),
       generation_prompt=st.booleans())
def test_a_rendered_conversation_has_special_ids_exactly_where_the_template_puts_them(tokenizer, messages, generation_prompt):
    encoder = ChatEncoder(tokenizer)
    encoded = encoder.conversation(messages, add_generation_prompt=generation_prompt)
    assert len(encoded.ids) == len(encoded.trained)
    special = [i for i in encoded.ids if i < len(SPECIAL_TOKENS)]
    expected = [encoder.eot]
    for message in messages:
        expected += [encoder.role[message["role"]], encoder.end]
    expected += [encoder.role["assistant"]] if generation_prompt else []
    assert special == expected
    # the same string as the Jinja template's rendering, and only assistant content and its <|end|> trained
    assert tokenizer.decode(encoded.ids, skip_special_tokens=False) == render(messages, generation_prompt)
    trained = [i for i, t in zip(encoded.ids, encoded.trained) if t]
    assert trained == [i for m in messages if m["role"] == "assistant" for i in [*encoder.text(m["content"]), encoder.end]]


@PROPERTY
@given(tokens=st.lists(st.integers(0, 2**16 - 1), max_size=300), seq_len=st.integers(1, 64))
def test_a_shard_reads_back_the_tokens_it_was_given(tmp_path_factory, tokens, seq_len):
    path = tmp_path_factory.mktemp("shard") / "train_00000.arrow"
    write_shard(path, np.array(tokens, dtype=np.uint16), seq_len)
    back = read_tokens(path)
    assert back.dtype == np.uint16 and back.tolist() == tokens
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left beside it


def _leaf_paths(model: type[Section], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            paths += _leaf_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


LEAVES = _leaf_paths(RunConfig)
VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                                st.text(max_size=12), st.sampled_from(["ddp", "tp", "pp", "fsdp", "http://x/", "-1"])),
                      lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=2),
                      max_leaves=4)
PATHS = st.one_of(st.sampled_from(LEAVES), st.sampled_from(LEAVES).map(lambda p: p + ".x"),
                  st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=16))


@PROPERTY
@given(changes=st.lists(st.tuples(PATHS, VALUES), max_size=4))
def test_a_random_config_is_valid_or_fails_in_one_line_naming_a_field(changes):
    tree: dict = {}
    for dotted, value in changes:
        parts = [p for p in dotted.split(".") if p]
        node = tree
        for key in parts[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        if parts:
            node[parts[-1]] = value
    try:
        config = configlib.validate(tree)
    except ConfigError as err:
        message = str(err)
        assert message.startswith("config error: ") and "\n" not in message
        assert "=" in message or "must" in message or "unknown key" in message, message
    else:
        json.dumps(config.model_dump(mode="json"))  # a valid config dumps (config.yaml, the cache key)
        assert configlib.validate(config.model_dump(mode="json")) == config


@PROPERTY
@given(text=st.text(max_size=40))
def test_any_set_option_parses_or_fails_in_one_line(text):
    try:
        key, _ = configlib.parse_override(text)
    except ConfigError as err:
        assert str(err).startswith("--set ") and "\n" not in str(err)
    else:
        assert "." in key


@pytest.mark.parametrize(("overrides", "message"), [
    ({"pretrain": {"nproc": 2, "parallel": {"strategy": "tp", "tp": 2}}, "model": {"n_kv_heads": 1, "tie_embeddings": False}},
     "model.n_kv_heads=1 must be divisible by pretrain.parallel's tensor-parallel degree 2"),
    ({"sft": {"nproc": 4, "parallel": {"strategy": "pp", "pp": 4}}, "model": {"n_layers": 2, "tie_embeddings": False}},
     "model.n_layers=2 must be >= sft.parallel.pp * stages per rank = 4"),
])
def test_impossible_parallel_degrees_fail_when_the_config_is_read(overrides, message):
    with pytest.raises(ConfigError, match="^config error: " + message.replace("*", r"\*").replace(".", r"\.")):
        configlib.validate(overrides)
