"""Post-training rows in the formats people already have (TRL's), read from JSONL, Parquet or a
`datasets` folder saved with `save_to_disk`.

    SFT          {"messages": [{"role", "content"}, ...]}  or  {"prompt": ..., "completion": ...}
    preferences  {"prompt": ..., "chosen": ..., "rejected": ...}   (or chosen/rejected whole
                 conversations sharing the prompt: TRL's implicit prompt)
    RL prompts   {"prompt": ..., "task": ..., "answer": ...}     (task and answer optional)

A prompt or completion is a string (TRL's standard format: a user turn, an assistant turn) or a
list of messages (conversational). Every row becomes message lists. A row that does not fit is
skipped and counted by reason (`RowCounts`); the first few are reported with file and line. Each
row keeps `index`: its 0-based position in the file(s) as read, skipped rows included.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmpipe.alignment.checker import TASKS
from llmpipe.errors import BadValue

ROLES = ("system", "user", "assistant")
REPORTED = 5  # skipped rows reported one by one


@dataclass(frozen=True)
class Source:
    file: str
    line: int  # 1-based line (JSONL) or row (Parquet, datasets)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class RowCounts:
    """Rows read, kept and skipped (by reason) for one config key's files."""

    key: str  # the config key the files came from, e.g. "sft.data"
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)  # "file:line: reason" of the first few
    read_by_file: Counter = field(default_factory=Counter)
    skipped_by_file: Counter = field(default_factory=Counter)

    def skip(self, reason: str, source: Source) -> None:
        self.skipped[reason] += 1
        self.skipped_by_file[source.file] += 1
        if len(self.first) < REPORTED:
            self.first.append(f"{source}: {reason}")
            print(f"{self.key}: skipped {source}: {reason}", file=sys.stderr)

    @property
    def kept(self) -> int:
        return self.read - sum(self.skipped.values())

    def require_rows(self, rows: list) -> None:
        """Stop, naming the file, when a file gave no usable row."""
        for file, n in self.read_by_file.items():
            if n - self.skipped_by_file[file] <= 0:
                reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common(3))
                raise BadValue(f"{self.key}: {file} has no usable row ({n} read: {reasons or 'none'})")
        if not rows:
            raise BadValue(f"{self.key}: no rows")

    def to_manifest(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "first_skipped": list(self.first)}


@dataclass(frozen=True)
class Conversation:
    index: int
    messages: list[dict]
    source: Source


@dataclass(frozen=True)
class PreferencePair:
    index: int
    prompt: list[dict]
    chosen: list[dict]  # the assistant turn(s) after the prompt
    rejected: list[dict]
    source: Source


@dataclass(frozen=True)
class Prompt:
    index: int
    prompt: list[dict]
    task: str | None
    answer: str | None
    source: Source


class RowError(ValueError):
    """Why a row is skipped (its message is the reason counted)."""


# --- reading files ---------------------------------------------------------------------------------


def read_rows(paths: list[Path], counts: RowCounts) -> Iterator[tuple[int, Source, Any]]:
    """(index, source, row) of every row of every file, in order; unparsable lines are counted."""
    index = 0
    for path in paths:
        for line, row in _file_rows(Path(path)):
            source = Source(str(path), line)
            counts.read += 1
            counts.read_by_file[source.file] += 1
            yield index, source, row
            index += 1


def _file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.is_dir():
        yield from _dataset_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError:
                    yield line, RowError("invalid JSON")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for line, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield line, row
    else:
        raise BadValue(f"{path}: not a .jsonl, .parquet or a `datasets` folder saved with save_to_disk")


def _dataset_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise BadValue(f"{path}: a folder, but not one `datasets.Dataset.save_to_disk` wrote") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise BadValue(f"{path}: a DatasetDict with splits {', '.join(dataset)}; give one split's folder")
    for line, row in enumerate(dataset, start=1):
        yield line, row


# --- normalising ---------------------------------------------------------------------------------


def _messages(value: Any, name: str, default_role: str) -> list[dict]:
    """A string (one `default_role` turn) or a list of {role, content} -> a message list."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"{name} is not a string or a list of messages")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RowError(f"{name} has a message without string content")
        if message.get("role") not in ROLES:
            raise RowError(f"{name} has an unknown role {message.get('role')!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _completion(value: Any, name: str) -> list[dict]:
    messages = _messages(value, name, "assistant")
    if any(m["role"] != "assistant" for m in messages):
        raise RowError(f"{name} has a turn that is not the assistant's")
    if any(not m["content"].strip() for m in messages):
        raise RowError("empty assistant turn")
    return messages


def _require(row: Any, *keys: str) -> None:
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError("not an object")
    for key in keys:
        if row.get(key) is None:
            raise RowError(f"missing key {key!r}")


def conversation(row: Any) -> list[dict]:
    """An SFT row -> its messages (at least one assistant turn, none empty)."""
    if isinstance(row, dict) and row.get("messages") is None and row.get("prompt") is not None:
        _require(row, "prompt", "completion")
        return _messages(row["prompt"], "prompt", "user") + _completion(row["completion"], "completion")
    _require(row, "messages")
    if not isinstance(row["messages"], list):
        raise RowError("messages is not a list of messages")
    messages = _messages(row["messages"], "messages", "user")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RowError("no assistant turn")
    if any(not m["content"].strip() for m in assistant):
        raise RowError("empty assistant turn")
    return messages


def preference(row: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference row -> (prompt, chosen, rejected) message lists."""
    _require(row, "chosen", "rejected")
    if row.get("prompt") is None:  # implicit prompt: two whole conversations with a common start
        chosen, rejected = _messages(row["chosen"], "chosen", "user"), _messages(row["rejected"], "rejected", "user")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise RowError("missing key 'prompt'")
        return chosen[:shared], _completion(chosen[shared:], "chosen"), _completion(rejected[shared:], "rejected")
    prompt = _messages(row["prompt"], "prompt", "user")
    return prompt, _completion(row["chosen"], "chosen"), _completion(row["rejected"], "rejected")


def prompt_row(row: Any) -> tuple[list[dict], str | None, str | None]:
    _require(row, "prompt")
    task, answer = row.get("task"), row.get("answer")
    if task is not None and task not in TASKS:
        raise RowError(f"unknown task {task!r}")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RowError("answer is not a string or a number")
    return _messages(row["prompt"], "prompt", "user"), task, None if answer is None else str(answer)


def _load(paths: list[Path], counts: RowCounts, parse, build) -> list:
    rows = []
    for index, source, row in read_rows(paths, counts):
        try:
            rows.append(build(index, source, *_as_tuple(parse(row))))
        except RowError as err:
            counts.skip(str(err), source)
    counts.require_rows(rows)
    return rows


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def load_conversations(paths: list[Path], counts: RowCounts) -> list[Conversation]:
    return _load(paths, counts, conversation, lambda i, s, messages: Conversation(i, messages, s))


def load_preferences(paths: list[Path], counts: RowCounts) -> list[PreferencePair]:
    return _load(paths, counts, preference, lambda i, s, p, c, r: PreferencePair(i, p, c, r, s))


def load_prompts(paths: list[Path], counts: RowCounts) -> list[Prompt]:
    return _load(paths, counts, prompt_row, lambda i, s, p, t, a: Prompt(i, p, t, a, s))
