"""Tiny run directories for the model, pretrain and export tests: shards, a tokenizer, fake manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmpipe import io
from llmpipe.config import validate
from llmpipe.data.shards import write_shard

VOCAB = 300
MODEL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=32)
PRETRAIN = dict(max_steps=8, batch_tokens=128, micro_batch_size=2, lr=3e-3, warmup_steps=2, eval_every=4,
                eval_steps=2, checkpoint_every=4, log_every=2, spike_factor=0.0,
                peak_flops=1e11)  # a fixed peak: no matmul measurement in tests


def synthetic_documents(n_docs: int, seed: int) -> list[np.ndarray]:
    """Arithmetic progressions mod 290 (+ offset past the special ids): learnable, with EOT between."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, stride, length = rng.integers(0, 290), rng.integers(1, 5), rng.integers(20, 120)
        docs.append((start + stride * np.arange(length)) % 290 + 10)
    return docs


def write_shards(folder: Path, train_tokens: int = 6000, val_tokens: int = 1200, seed: int = 0,
                 n_train_shards: int = 2) -> Path:
    """Train and val shards plus the manifest.json that load_split verifies against."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def stream(n_tokens: int, seed: int) -> np.ndarray:
        docs = synthetic_documents(n_tokens // 20, seed)
        flat = np.concatenate([np.concatenate([[0], d]) for d in docs]).astype(np.uint16)
        return flat[:n_tokens]

    train = stream(train_tokens, seed)
    files = {}
    for i, part in enumerate(np.array_split(train, n_train_shards)):
        write_shard(folder / f"train_{i:05d}.arrow", part, 32)
    write_shard(folder / "val_00000.arrow", stream(val_tokens, seed + 1), 32)
    for path in sorted(folder.glob("*.arrow")):
        files[path.name] = {"sha256": io.sha256_file(path), "bytes": path.stat().st_size}
    fingerprint = io.sha256_file(folder / "train_00000.arrow")
    io.write_json(folder / "manifest.json", {"stage": "shard", "files": files, "fingerprint": fingerprint})
    return folder


def write_tokenizer(folder: Path) -> Path:
    """A byte-level BPE with our special tokens first (EOT = 0), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmpipe.tokenizer.special import SPECIAL_TOKENS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello model", "def f(x): return x + 1"]
    tok.train_from_iterator(text * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    io.write_json(folder / "manifest.json", {"stage": "tokenizer", "files": {}, "fingerprint": "test-tokenizer"})
    return folder


def run_config(run_dir: Path, **pretrain):
    """A validated RunConfig for the tiny test model writing to run_dir."""
    return validate({"run": {"name": "t", "seed": 7, "run_dir": str(run_dir)},
                     "tokenizer": {"vocab_size": VOCAB},
                     "model": MODEL, "pretrain": {**PRETRAIN, **pretrain}})


def make_run_dir(run_dir: Path) -> Path:
    """Tokenizer and shard stages 'completed' in run_dir, so `pretrain` can execute."""
    write_tokenizer(Path(run_dir) / "tokenizer")
    write_shards(Path(run_dir) / "shard")
    return Path(run_dir)
