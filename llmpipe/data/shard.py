"""The `shard` stage: documents -> token ids -> Arrow IPC shards, with a held-out validation split.

Each document is encoded without special tokens and followed by one EOT (id 0), so a split's
token count is exactly `sum(len(encode(doc)) + 1)` over its documents. A document goes to `val`
when a keyed hash of its text and the run seed falls below `val_fraction`: the same corpus and
seed always give the same split, and a document keeps its split when others are added.
Special-token strings inside a document (a literal "<|endoftext|>") are encoded as plain text,
so EOT in the shards only ever separates documents.

The work streams: batches of `batch_docs` documents (or ~2M characters) are encoded by
`encode_batch_fast` (Rust, all cores, GIL released) on helper threads while the main thread
reads the next batch and packs the previous one into numpy arrays (no per-token Python loop),
and full shards are written on another thread. Memory holds about two shards of tokens per
split plus three batches, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from llmpipe.config import ShardSection
from llmpipe.data.documents import DocumentCounts, read_documents
from llmpipe.data.shards import shard_name, token_dtype, write_shard
from llmpipe.progress import progress
from llmpipe.tokenizer.special import EOT_ID, ordinary
from llmpipe.tokenizer.train import load_tokenizer

SPLITS = ("train", "val")
BATCH_CHARS = 2_000_000  # a batch also ends at this many characters: long documents make small batches
ENCODE_DEPTH = 2  # batches being encoded while the main thread packs the previous one


def is_val(text: str | bytes, seed: int, val_fraction: float) -> bool:
    """Deterministic per-document split: blake2b(UTF-8 text, key=seed) as a fraction in [0, 1)."""
    if val_fraction <= 0.0:
        return False
    data = text.encode("utf-8") if isinstance(text, str) else text
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()[:64]).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


@dataclass
class _SplitWriter:
    """Accumulates one split's tokens and cuts them into shards of exactly `per_shard` tokens."""

    split: str
    folder: Path
    per_shard: int
    seq_len: int
    dtype: np.dtype
    pool: ThreadPoolExecutor
    shards: list[dict] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    _parts: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0
    _pending: Future | None = None

    def add(self, arrays: list[np.ndarray]) -> None:
        """Append documents' token arrays, each followed by one EOT."""
        if not arrays:
            return
        n = sum(len(a) for a in arrays) + len(arrays)
        packed = np.empty(n, dtype=self.dtype)
        pos = 0
        for a in arrays:
            packed[pos:pos + len(a)] = a
            pos += len(a)
            packed[pos] = EOT_ID
            pos += 1
        self._parts.append(packed)
        self._buffered += n
        self.tokens += n
        self.documents += len(arrays)
        if self._buffered >= self.per_shard:
            stream = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
            start = 0
            while len(stream) - start >= self.per_shard:
                self._write(stream[start:start + self.per_shard])
                start += self.per_shard
            self._parts = [stream[start:]] if start < len(stream) else []
            self._buffered = len(stream) - start

    def close(self) -> None:
        if self._buffered:
            self._write(np.concatenate(self._parts))
            self._parts, self._buffered = [], 0
        self._wait()

    def _write(self, tokens: np.ndarray) -> None:
        self._wait()  # at most one shard in flight per split: memory stays bounded
        name = shard_name(self.split, len(self.shards))
        self.shards.append({"split": self.split, "file": name, "tokens": int(len(tokens)),
                            "rows": -(-len(tokens) // self.seq_len)})
        self._pending = self.pool.submit(write_shard, self.folder / name, tokens, self.seq_len)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a failed write
            self._pending = None


def _encoded(tokenizer: Tokenizer, batches: Iterable[list[str]], pool: ThreadPoolExecutor, depth: int
             ) -> Iterator[tuple[list[str], list]]:
    """(texts, encodings) per batch, in order, with up to `depth` batches being encoded meanwhile.

    Two `encode_batch_fast` calls in flight share rayon's pool, so the cores that finish one
    batch early start on the next instead of idling at the tail.
    """
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    pending: deque[tuple[list[str], Future]] = deque()
    for texts in batches:
        pending.append((texts, pool.submit(encode, texts, add_special_tokens=False)))
        if len(pending) > depth:
            texts, future = pending.popleft()
            yield texts, future.result()
    while pending:
        texts, future = pending.popleft()
        yield texts, future.result()


def text_batches(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Lists of up to `max_docs` texts and about `max_chars` characters."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_shards(texts: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path, *, seq_len: int,
                 tokens_per_shard: int, val_fraction: float, seed: int, batch_docs: int = 512) -> dict:
    """Encode `texts` into `{train,val}_NNNNN.arrow` shards in `out_dir`; return counts and the shard list."""
    out_dir = Path(out_dir)
    tokenizer = ordinary(tokenizer)  # special-token strings in documents stay plain text
    dtype = token_dtype(tokenizer.get_vocab_size())
    per_shard = max(seq_len, tokens_per_shard // seq_len * seq_len)
    split_bytes = {split: 0 for split in SPLITS}
    with ThreadPoolExecutor(ENCODE_DEPTH, thread_name_prefix="encode") as encode_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
        writers = {s: _SplitWriter(s, out_dir, per_shard, seq_len, dtype, write_pool) for s in SPLITS}
        batches = text_batches(texts, batch_docs, BATCH_CHARS)
        bar = progress(desc="shard", unit="doc")
        for batch, encodings in _encoded(tokenizer, batches, encode_pool, ENCODE_DEPTH):
            bar.update(len(batch))
            arrays: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for text, encoding in zip(batch, encodings):
                data = text.encode("utf-8")
                split = "val" if is_val(data, seed, val_fraction) else "train"
                arrays[split].append(np.array(encoding.ids, dtype=dtype))
                split_bytes[split] += len(data)
            for split in SPLITS:
                writers[split].add(arrays[split])
        for writer in writers.values():
            writer.close()
        bar.close()
    return {
        "train_documents": writers["train"].documents,
        "val_documents": writers["val"].documents,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_shards": len(writers["train"].shards),
        "val_shards": len(writers["val"].shards),
        "bytes": sum(split_bytes.values()),
        "train_bytes": split_bytes["train"],
        "val_bytes": split_bytes["val"],  # the denominator of bits per byte on the held-out split
        "tokens_per_shard": per_shard,
        "dtype": dtype.name,
        "shards": writers["train"].shards + writers["val"].shards,
    }


def shard_stage(ctx, cfg: ShardSection) -> dict:
    """Shard the documents with the tokenizer stage's tokenizer into `ctx.out_dir`."""
    source = ctx.inputs["documents"]
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
    counts = DocumentCounts()
    t0 = time.perf_counter()
    result = write_shards(read_documents(source, counts), tokenizer, ctx.out_dir, seq_len=cfg.seq_len,
                          tokens_per_shard=cfg.tokens_per_shard, val_fraction=cfg.val_fraction,
                          seed=ctx.seed, batch_docs=cfg.batch_docs)
    seconds = time.perf_counter() - t0
    tokens = result["train_tokens"] + result["val_tokens"]
    return {
        **counts.as_dict(),
        **result,
        "timing": {  # this run's: MLflow only
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "mb_per_second": result["bytes"] / 1e6 / seconds if seconds > 0 else 0.0,
        },
    }


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("shard")
