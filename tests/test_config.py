from pathlib import Path

import pytest

from llmpipe import config as configlib
from llmpipe.config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    config = configlib.load(path)
    assert config.run.name
    assert config.model.vocab_size >= config.tokenizer.vocab_size


def test_tiny_is_the_classic_small_model():
    model = configlib.load("configs/tiny.yaml").model
    assert (model.vocab_size, model.d_model, model.n_heads, model.d_ff, model.n_layers) == (10000, 128, 8, 256, 6)


def test_override_is_parsed_as_yaml(tmp_path):
    config = configlib.load("configs/tiny.yaml", ["shard.seq_len=64", "crawl.seeds=[http://a/, http://b/]"],
                            run_dir=tmp_path)
    assert config.shard.seq_len == 64
    assert config.crawl.seeds == ["http://a/", "http://b/"]
    assert config.run_dir == tmp_path


@pytest.mark.parametrize("override, expected", [
    ("tokenizer.vocab_size=-5", "config error: tokenizer.vocab_size=-5: Input should be greater than or equal to 300"),
    ("tokenizer.vocab_sz=5", "config error: tokenizer.vocab_sz: unknown key; allowed keys: input, "),
    ("prepare.executor=spark", "config error: prepare.executor=\"spark\": Input should be 'local', 'slurm' or 'ray'"),
    ("tokenizer.input=/no/such/folder", "config error: tokenizer.input=\"/no/such/folder\": path does not exist"),
    ("nosuchsection.key=1", "config error: nosuchsection: unknown key; allowed keys: align, crawl, "),
    ("pretrain.parallel.grad_sync=often",
     "config error: pretrain.parallel.grad_sync=\"often\": Input should be 'step' or 'micro_batch'"),
    ("pretrain.parallel.grad_sync=micro_batch", "config error: pretrain.parallel={...}: grad_sync=micro_batch needs "
     "a strategy that shards gradients (zero2, fsdp or fsdp_tp), not ddp"),
])
def test_bad_values_name_field_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        configlib.load("configs/tiny.yaml", [override])
    message = str(err.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_cross_section_check():
    with pytest.raises(ConfigError, match="model.vocab_size=500 must be >= tokenizer.vocab_size=10000"):
        configlib.load("configs/tiny.yaml", ["model.vocab_size=500"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        configlib.load("configs/tiny.yaml", ["seq_len"])


def test_section_digest_tracks_values():
    a = configlib.load("configs/tiny.yaml")
    b = configlib.load("configs/tiny.yaml", ["shard.seq_len=128"])
    assert a.shard.digest() != b.shard.digest()
    assert a.tokenizer.digest() == b.tokenizer.digest()


@pytest.mark.parametrize("seed", ["file:///etc/passwd", "ftp://example.org/a.html", "javascript:alert(1)", "http:///a"])
def test_a_seed_that_is_not_a_web_url_is_refused_when_the_config_is_read(seed):
    with pytest.raises(ConfigError) as err:
        configlib.load("configs/tiny.yaml", [f"crawl.seeds=[{seed!r}]"])
    message = str(err.value)
    assert message == (f"config error: crawl.seeds=[\"{seed}\"]: {seed!r} is not an http(s) URL with a host "
                       "(allowed schemes: http, https)") and "\n" not in message
