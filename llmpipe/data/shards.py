"""Arrow IPC token shards: the hand-over between `shard` and every training stage.

A shard is an Arrow IPC *stream* file (what `datasets.Dataset.from_file` reads) holding ONE
record batch with one column `input_ids: list<uint16 | uint32>`. Each row is `seq_len` tokens
of the packed stream (documents joined by EOT); the last row of a shard may be shorter. The
flat token stream of a shard is the list column's child array, read zero-copy from a memory map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from llmpipe import io

COLUMN = "input_ids"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.arrow"


def write_shard(path: str | Path, tokens: np.ndarray, seq_len: int) -> None:
    """Write a flat token array as one record batch of `seq_len`-token rows, atomically."""
    tokens = np.ascontiguousarray(tokens)
    offsets = np.minimum(np.arange(0, len(tokens) + seq_len, seq_len, dtype=np.int32), len(tokens))
    offsets = np.unique(offsets)  # the last row may be short; no empty rows
    rows = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(tokens))
    batch = pa.record_batch([rows], names=[COLUMN])
    with io.atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)


def read_tokens(path: str | Path) -> np.ndarray:
    """The flat token stream of one shard: a read-only numpy view into a memory map (no copy)."""
    source = pa.memory_map(str(path), "r")
    batches = list(pa.ipc.open_stream(source))
    if len(batches) != 1:
        raise ValueError(f"{path}: expected one record batch, found {len(batches)}")
    column = batches[0].column(COLUMN)
    flat = column.values.slice(column.offsets[0].as_py(), column.offsets[-1].as_py() - column.offsets[0].as_py())
    return flat.to_numpy(zero_copy_only=True)


def load_split(shard_dir: str | Path, split: str, verify: bool = True) -> list[np.ndarray]:
    """All shards of a split (`train` or `val`) listed in the shard stage's manifest, in order.

    With `verify`, each file's sha256 is checked against the manifest first, so a flipped byte
    raises `io.ChecksumError` naming the file instead of silently training on garbage.
    """
    shard_dir = Path(shard_dir)
    manifest = io.read_manifest(shard_dir)
    names = sorted(name for name in manifest["files"] if name.startswith(f"{split}_") and name.endswith(".arrow"))
    arrays = []
    for name in names:
        if verify:
            io.verify_sha256(shard_dir / name, manifest["files"][name]["sha256"])
        arrays.append(read_tokens(shard_dir / name))
    return arrays
