"""Batches of (input, target) windows over memory-mapped token shards.

A window is `seq_len + 1` tokens starting at a multiple of `seq_len` inside one shard (the input
is its first `seq_len` tokens, the target its last `seq_len`). The windows of all shards are
numbered 0..N-1; one epoch visits them in the order of a seeded permutation of range(N), a new
one each epoch. The permutation is a keyed Feistel network (with cycle walking), computed one
index at a time: no index array is ever built, so with the memory-mapped token streams the
loader's RAM stays flat whatever the dataset size, and every batch mixes all shards.

Every rank walks the same global order; a global micro-batch is the next `batch_size * world_size`
windows, and rank r takes the r-th slice of them. The position in that walk (epoch, index:
windows consumed by all ranks together) is the whole state (`state_dict`), so resuming is exact,
also on another number of ranks or another micro-batch size: an optimizer step of the same
global batch reads the same windows whatever the split.

Takes rank and world size as numbers: no `torch.distributed` here.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _mix(x: int, key: int) -> int:
    """splitmix64's finalizer of x + key: a fast, well-spread 64-bit hash."""
    x = (x + key + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for one use of the run's seed (a rollout, a prompt, a sample): well spread, < 2**63."""
    for key in keys:
        seed = _mix(seed, key)
    return seed & (2**63 - 1)


class Permutation:
    """A seeded bijection of range(n) in O(1) memory: a 4-round Feistel network on the smallest
    even-bit domain >= n, re-applied until the value lands inside range(n) (cycle walking)."""

    def __init__(self, n: int, key: int):
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half, self.mask = n, bits // 2, (1 << (bits // 2)) - 1
        self.keys = [_mix(key, r) for r in range(4)]

    def __call__(self, i: int) -> int:
        while True:
            left, right = i >> self.half, i & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix(right, k) & self.mask)
            i = (left << self.half) | right
            if i < self.n:
                return i


class TokenLoader:
    def __init__(self, streams: Sequence[np.ndarray], seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.streams = list(streams)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        windows = [max(0, (len(s) - 1) // seq_len) for s in self.streams]  # per shard
        self.total_windows = sum(windows)
        if self.total_windows == 0:
            raise ValueError(f"no shard holds a window of seq_len+1={seq_len + 1} tokens "
                             f"({sum(len(s) for s in self.streams)} tokens in {len(self.streams)} shards)")
        self._ends = np.cumsum(windows).tolist()  # global window ids of shard i end before _ends[i]
        self.epoch, self.position = 0, 0  # the state: next window is order(epoch)[position]
        self._order: tuple[int, Permutation] | None = None

    def _window(self, epoch: int, position: int) -> tuple[int, int]:
        """(shard, first token) of the window at `position` of epoch `epoch`."""
        index = position
        if self.shuffle:
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, Permutation(self.total_windows, _mix(self.seed, epoch)))
            index = self._order[1](position)
        shard = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[shard - 1] if shard else 0)
        return shard, local * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), each (batch_size, seq_len) int64; y is x shifted left by one."""
        rows = []
        for i in range(self.batch_size * self.world_size):
            if i // self.batch_size == self.rank:
                shard, start = self._window(self.epoch, self.position)
                rows.append(np.asarray(self.streams[shard][start:start + self.seq_len + 1], dtype=np.int64))
            self.position += 1
            if self.position == self.total_windows:
                self.epoch, self.position = self.epoch + 1, 0
        block = torch.from_numpy(np.stack(rows))  # (B, T+1)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def rewind(self) -> None:
        """Back to the first window of the first epoch (validation reads the same windows each time)."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "total_windows": self.total_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; the position is global, so rank count and micro-batch
        size may differ from the saving loader's (the order of windows may not)."""
        for key in ("seed", "seq_len", "total_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch, self.position = state["epoch"], state["position"]


class RowLoader:
    """Micro-batches of whole examples (SFT rows, preference pairs), in the same seeded global
    order and with the same rank slicing and state as `TokenLoader`: `collate(items)` turns this
    rank's `batch_size` items into a batch. The items are held in memory (post-training data is
    small next to a pretraining corpus)."""

    def __init__(self, items: Sequence, batch_size: int, collate, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if not items:
            raise ValueError("no rows to load")
        self.items, self.batch_size, self.collate = list(items), batch_size, collate
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.total_rows = len(self.items)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, Permutation] | None = None

    def _index(self, epoch: int, position: int) -> int:
        if not self.shuffle:
            return position
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, Permutation(self.total_rows, _mix(self.seed, epoch)))
        return self._order[1](position)

    def next_items(self) -> list:
        """This rank's slice of the next `batch_size * world_size` items of the global order."""
        chosen = []
        for i in range(self.batch_size * self.world_size):
            if i // self.batch_size == self.rank:
                chosen.append(self.items[self._index(self.epoch, self.position)])
            self.position += 1
            if self.position == self.total_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return chosen

    def next_batch(self):
        return self.collate(self.next_items())

    def rewind(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "total_rows": self.total_rows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "total_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch, self.position = state["epoch"], state["position"]
