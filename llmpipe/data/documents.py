"""Read a folder of documents: the hand-over from `prepare` to `tokenizer` and `shard`.

Every file below the folder is read, in sorted relative-path order, so the same folder always
yields the same texts in the same order:

    *.jsonl, *.jsonl.gz, *.json.gz   one JSON object per line with a string field "text"
    *.parquet                        a string column "text"
    *.arrow                          an Arrow IPC file or stream with a string column "text"
    *.txt, *.md                      the whole file is one document (UTF-8)

A bad document is skipped and counted under a reason, never raised: `malformed_json`,
`not_an_object`, `missing_text`, `non_string_text`, `empty_text` (empty or only whitespace),
`undecodable` (bytes that are not UTF-8, or lone surrogates). A file that cannot be read at
all (truncated gzip, corrupt Parquet, no "text" column) counts once under `unreadable_file`
or `no_text_column`, plus the documents already read from it. Other files are counted under
`unsupported_file` (hidden files and manifest.json are ignored).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from llmpipe.errors import MissingInput

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".md")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
_IGNORED_NAMES = {"manifest.json"}
FILE_REASONS = {"unreadable_file", "no_text_column", "unsupported_file"}  # counted per file, not per document
_ARROW_BATCH_ROWS = 4096


class NoDocumentsError(MissingInput):
    """The input folder is missing or holds no document files (the CLI prints it as one line)."""


@dataclass
class DocumentCounts:
    """What a pass over a folder read and skipped."""

    files: int = 0  # document files opened
    documents: int = 0  # texts yielded
    chars: int = 0  # characters in the yielded texts
    skipped: Counter = field(default_factory=Counter)  # reason -> documents (or files) skipped

    @property
    def skipped_documents(self) -> int:
        return sum(n for reason, n in self.skipped.items() if reason not in FILE_REASONS)

    def as_dict(self) -> dict:
        """Counts for a stage result: flat numbers plus `skipped.<reason>`."""
        return {"files": self.files, "documents": self.documents, "chars": self.chars,
                "skipped_documents": self.skipped_documents,
                "skipped": {reason: n for reason, n in sorted(self.skipped.items())}}


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES),
                           ("parquet", PARQUET_SUFFIXES), ("arrow", ARROW_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def list_files(root: str | Path) -> list[Path]:
    """Every file below `root` that may hold documents, sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise NoDocumentsError(f"document folder not found: {root}")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)
             and p.name not in _IGNORED_NAMES]
    if not any(_kind(p) for p in files):
        raise NoDocumentsError(f"no document files (.jsonl[.gz], .parquet, .arrow, .txt, .md) in {root}")
    return files


def _check(text: object, counts: DocumentCounts) -> str | None:
    """`text` when it is a usable document, else None with the reason counted."""
    if not isinstance(text, str):
        counts.skipped["missing_text" if text is None else "non_string_text"] += 1
        return None
    if not text or text.isspace():
        counts.skipped["empty_text"] += 1
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")  # lone surrogates from JSON "\ud800" escapes cannot be tokenized
        except UnicodeEncodeError:
            counts.skipped["undecodable"] += 1
            return None
    return text


def _jsonl(path: Path, counts: DocumentCounts) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue  # blank lines are not documents
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                counts.skipped["undecodable"] += 1
                continue
            except ValueError:
                counts.skipped["malformed_json"] += 1
                continue
            if not isinstance(record, dict):
                counts.skipped["not_an_object"] += 1
                continue
            text = _check(record.get("text"), counts)
            if text is not None:
                yield text


def _text_file(path: Path, counts: DocumentCounts) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        counts.skipped["undecodable"] += 1
        return
    text = _check(text, counts)
    if text is not None:
        yield text


def _text_column(batches: Iterable, counts: DocumentCounts) -> Iterator[str]:
    import pyarrow as pa

    for batch in batches:
        if "text" not in batch.schema.names:
            counts.skipped["no_text_column"] += 1
            return
        column = batch.column("text")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            counts.skipped["no_text_column"] += 1
            return
        for text in column.to_pylist():
            text = _check(text, counts)
            if text is not None:
                yield text


def _parquet(path: Path, counts: DocumentCounts) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = ["text"] if "text" in parquet.schema_arrow.names else None
    yield from _text_column(parquet.iter_batches(batch_size=_ARROW_BATCH_ROWS, columns=columns), counts)


def _arrow(path: Path, counts: DocumentCounts) -> Iterator[str]:
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        batches = pa.ipc.open_stream(source)
    yield from _text_column(batches, counts)


_READERS = {"jsonl": _jsonl, "text": _text_file, "parquet": _parquet, "arrow": _arrow}


def read_documents(root: str | Path, counts: DocumentCounts | None = None) -> Iterator[str]:
    """Yield the text of every good document below `root`, in a deterministic order.

    Pass a `DocumentCounts` to learn what was read and skipped; it is updated as the iterator
    advances. Raises `NoDocumentsError` (one line naming the folder) before yielding anything
    when the folder is missing or holds no document files.
    """
    files = list_files(root)
    counts = counts if counts is not None else DocumentCounts()
    return _iterate(files, counts)


def _iterate(files: list[Path], counts: DocumentCounts) -> Iterator[str]:
    import pyarrow as pa

    for path in files:
        kind = _kind(path)
        if kind is None:
            counts.skipped["unsupported_file"] += 1
            continue
        counts.files += 1
        try:
            for text in _READERS[kind](path, counts):
                counts.documents += 1
                counts.chars += len(text)
                yield text
        except (OSError, EOFError, zlib.error, pa.ArrowException):
            counts.skipped["unreadable_file"] += 1

