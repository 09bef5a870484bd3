"""N-gram overlap between evaluation items and the training data: which items a model may have seen.

The test is the one of GPT-3 (Appendix C) as lm-evaluation-harness implements it
(`lm_eval/decontamination/janitor.py`, `docs/decontamination.md`): an evaluation item is
contaminated when any of its word n-grams (13 by default; GPT-3 used 8 to 13 by dataset) also
occurs in some training document. The direction is a report, not a filter: for each item, whether
it overlaps, how many of its distinct n-grams do, and the first training source (a document's URL,
its id, or `file:line`) that shares one.

    index = TrainingIndex.from_documents(run / "prepare" / "documents")
    index.add_jsonl_texts(Path("sft.jsonl"))
    flags = flag([(item_id, question + " " + answer), ...], index)
    summary(flags)  # {"n": ..., "n_contaminated": ..., "examples": [{"id", "source"}, ...]}

Words. A text is normalised with datatrove's `simplify_text` and `NORM`, its default `TextNormConfig`
but for numbers, which stay as written (datatrove's default turns every number into `0`, which
makes "What is 12 + 30? 42" the n-gram of every sum): lowercase; each of datatrove's
punctuation characters (ASCII and CJK punctuation, control characters) becomes a space, so
"well-known" is two words and "don't" is "don t"; combining diacritics are dropped after NFD
("café" is "cafe"). The words are then the whitespace-separated pieces, as lm-eval splits them.
`words(text)` is exactly `simplify_text(text).split()`; it only skips two steps whose effect the
split makes moot (collapsing whitespace) or that do nothing to ASCII (NFD), for speed.

Short texts. A text of fewer than n words has no n-gram (lm-eval's `form_ngrams` yields none), so
such an item is never flagged, whatever the training data holds: `ngrams` of it is 0 in `flag`.
Build items from question and answer together (as datatrove's overlap n-grams do) to keep short
questions checkable, or use a smaller n.

Hashes. An n-gram is the space-joined string of its n words, stored as datatrove's 64-bit
`xxhash64` of that string (`HashConfig(precision=64, hash_fc="xxhash")`), the same number
datatrove's `NGramsDecontFilter` looks up. The index is a sorted uint64 array with a parallel
uint32 array of source numbers: 12 bytes per distinct n-gram, about one per word, so roughly two
bytes of index per byte of English text, where a dict of Python ints takes about 100 bytes per
n-gram. With 64-bit hashes, 10^6 item n-grams against 10^8 training n-grams collide by chance
with probability about 5e-6.

From datatrove (0.10) this module uses `simplify_text` and `TextNormConfig` (the normalisation),
`ngrams` (the sliding window) and `HashConfig` / `create_hash_func` (the hash). Not used:
`NGramsDecontIndexer`, because its `run` imports lighteval and loads the tasks' datasets from the
Hub (lighteval is not installed, and evaluation data here is local), and because it indexes the
evaluation side, where a report needs the training side indexed with a source per n-gram;
`NGramsDecontFilter`, because it drops training documents (answering "is this document
contaminated", with a task name) instead of naming, per item, the documents it overlaps; and
both steps' word tokenizer (`load_word_tokenizer`, spaCy's blank English for "en"), which also
splits "cannot" and "dont" in two and is about 60 times slower than `str.split` on normalised
text, for no gain once the punctuation is gone. `NGramsDecontConfig` is not reused either: its
`find_query_ngrams` / `find_overlap_ngrams` describe a query/label split this report has no use for.
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.text import ngrams as _windows

from llmpipe.errors import BadValue

DEFAULT_N = 13  # lm-eval's n-gram size
CHAT_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")  # TRL-shaped rows
EXAMPLES = 5  # contaminated items named in `summary`
HASH_CONFIG = HashConfig(precision=64, hash_fc="xxhash")
_hash = create_hash_func(HASH_CONFIG)
NORM = TextNormConfig(norm_numbers=False)  # numbers are what arithmetic items differ in
_COMPACT_AT = 1 << 22  # pending n-grams merged into the sorted arrays past this many (~48 MB)


# --- words and n-grams ---------------------------------------------------------------------------


def words(text: str, norm: TextNormConfig | None = None) -> list[str]:
    """`simplify_text(text, norm).split()`: the normalised words n-grams are made of."""
    norm = norm or NORM
    text = simplify_text(text, replace(norm, norm_whitespace=False, norm_unicode_diacritics=False))
    if norm.norm_unicode_diacritics and not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.split()


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadValue(f"n-gram size must be a positive integer, got {n!r}")
    return n


def _joined(text: str, n: int, norm: TextNormConfig | None) -> Iterator[str]:
    return map(" ".join, _windows(words(text, norm), _check_n(n)))


def ngrams(text: str, n: int = DEFAULT_N, norm: TextNormConfig | None = None) -> set[str]:
    """The distinct n-grams of `text`, each its n normalised words joined by one space.

    Empty when `text` has fewer than n words (lm-eval skips such texts too)."""
    return set(_joined(text, n, norm))


def ngram_hashes(text: str, n: int = DEFAULT_N, norm: TextNormConfig | None = None) -> np.ndarray:
    """(number of n-grams,) uint64: datatrove's xxhash64 of each n-gram, in text order."""
    return np.fromiter(map(_hash, _joined(text, n, norm)), dtype=np.uint64)


# --- the training index --------------------------------------------------------------------------


class TrainingIndex:
    """Every distinct training n-gram (as a 64-bit hash) with the first source that contains it.

    Built from `(source, text)` pairs; "first" is in the order they are added, so the same data
    added in the same order gives the same index. `documents`, `chars` and `skipped` (reason ->
    rows) count what went in.
    """

    def __init__(self, documents: Iterable[tuple[str, str]] = (), n: int = DEFAULT_N,
                 norm: TextNormConfig | None = None):
        self.n = _check_n(n)
        self.norm = norm or NORM
        self.sources: list[str] = []  # source number -> source
        self.documents = 0
        self.chars = 0
        self.skipped: Counter = Counter()
        self._hashes = np.empty(0, dtype=np.uint64)  # sorted, distinct
        self._owners = np.empty(0, dtype=np.uint32)  # source number of each hash's first document
        self._pending: list[tuple[np.ndarray, int]] = []  # (hashes, source number) not merged yet
        self._pending_size = 0
        self.add_all(documents)

    def add(self, source: str, text: str) -> None:
        """Index one training text under `source`."""
        hashes = ngram_hashes(text, self.n, self.norm)
        self.documents += 1
        self.chars += len(text)
        if not len(hashes):
            return
        self._pending.append((hashes, len(self.sources)))
        self.sources.append(source)
        self._pending_size += len(hashes)
        if self._pending_size >= _COMPACT_AT:
            self._compact()

    def add_all(self, documents: Iterable[tuple[str, str]]) -> None:
        for source, text in documents:
            self.add(source, text)

    @classmethod
    def from_documents(cls, folder: str | Path, n: int = DEFAULT_N,
                       norm: TextNormConfig | None = None) -> TrainingIndex:
        """Index `prepare`'s output folder: `*.jsonl[.gz]` lines or `*.parquet` rows with `text`.

        A document's source is its `metadata.url` (or a top-level `url`), else its `id`, else
        `<file inside the folder>:<line>` (1-based). Files are read in sorted order."""
        index = cls(n=n, norm=norm)
        index.add_all(_prepared_documents(Path(folder), index.skipped))
        return index

    def add_jsonl_texts(self, path: str | Path, fields: Sequence[str] = CHAT_FIELDS, name: str | None = None) -> int:
        """Index a JSONL file of chat rows; returns the rows indexed.

        Each row's text is every string under `fields` (a string, or a list of messages whose
        `content` is taken), joined by newlines: `messages`, `prompt`/`completion` and
        `prompt`/`chosen`/`rejected` rows all work with the default fields. The source is
        `<name>:<line>` (1-based; `name` defaults to the file's name)."""
        path, added = Path(path), 0
        for line, row in _records(path, self.skipped):
            text = "\n".join(_strings([row.get(k) for k in fields]))
            if not text.strip():
                self.skipped["no_text"] += 1
                continue
            self.add(f"{name or path.name}:{line}", text)
            added += 1
        return added

    def __len__(self) -> int:
        """Distinct n-grams indexed."""
        self._compact()
        return len(self._hashes)

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, owner): for each hash whether it is indexed, and if so its source number."""
        self._compact()
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(self._hashes):
            return np.zeros(len(hashes), dtype=bool), np.zeros(len(hashes), dtype=np.uint32)
        at = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        found = self._hashes[at] == hashes
        return found, np.where(found, self._owners[at], 0).astype(np.uint32)

    def stats(self) -> dict:
        return {"n": self.n, "documents": self.documents, "chars": self.chars, "ngrams": len(self),
                "skipped": dict(sorted(self.skipped.items()))}

    def _compact(self) -> None:
        """Merge the pending n-grams into the sorted arrays, keeping each hash's earliest source."""
        if not self._pending:
            return
        hashes = np.concatenate([self._hashes] + [h for h, _ in self._pending])
        owners = np.concatenate([self._owners] + [np.full(len(h), s, dtype=np.uint32) for h, s in self._pending])
        self._pending, self._pending_size = [], 0
        order = np.argsort(hashes, kind="stable")  # ties keep insertion order: the earliest source first
        hashes, owners = hashes[order], owners[order]
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        self._hashes, self._owners = hashes[first], owners[first]


def _strings(value: object) -> Iterator[str]:
    """Every string in a field: itself, a list's items, a message's `content`."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        yield from _strings(value.get("content"))


def _source(record: dict, file: str, line: int) -> str:
    metadata = record.get("metadata")
    url = (metadata.get("url") if isinstance(metadata, dict) else None) or record.get("url")
    if isinstance(url, str) and url:
        return url
    if record.get("id") not in (None, ""):
        return str(record["id"])
    return f"{file}:{line}"


def _records(path: Path, skipped: Counter) -> Iterator[tuple[int, dict]]:
    """(1-based line or row, record) of a JSONL or Parquet file."""
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        columns = [c for c in ("text", "id", "metadata", "url") if c in parquet.schema_arrow.names]
        row = 0
        for batch in parquet.iter_batches(columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield row, record
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                skipped["malformed_json"] += 1
                continue
            if not isinstance(record, dict):
                skipped["not_an_object"] += 1
                continue
            yield line, record


def _prepared_documents(folder: Path, skipped: Counter) -> Iterator[tuple[str, str]]:
    from llmpipe.data.documents import list_files

    for path in list_files(folder):  # raises NoDocumentsError for a missing or empty folder
        name = path.name.lower()
        if not name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".parquet")):
            skipped["unsupported_file"] += 1
            continue
        file = path.relative_to(folder).as_posix()
        for line, record in _records(path, skipped):
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                skipped["missing_text" if text is None else "empty_text"] += 1
                continue
            yield _source(record, file, line), text


# --- the report ----------------------------------------------------------------------------------


def flag(items: list[tuple[str, str]], index: TrainingIndex) -> list[dict]:
    """For each (item id, item text), in order: {"id", "contaminated", "source", "ngrams"}.

    `ngrams` counts the item's distinct n-grams found in the training data; `source` is the
    earliest-added training source among those that share one (None when clean). An item of
    fewer than `index.n` words has no n-grams and is never contaminated."""
    flags = []
    for item_id, text in items:
        hashes = np.unique(ngram_hashes(text, index.n, index.norm))
        found, owners = index.lookup(hashes)
        hits = int(found.sum())
        source = index.sources[int(owners[found].min())] if hits else None
        flags.append({"id": item_id, "contaminated": hits > 0, "source": source, "ngrams": hits})
    return flags


def summary(flags: list[dict]) -> dict:
    """{"n": items, "n_contaminated": ..., "examples": the first few contaminated {id, source}}."""
    contaminated = [f for f in flags if f["contaminated"]]
    return {"n": len(flags), "n_contaminated": len(contaminated),
            "examples": [{"id": f["id"], "source": f["source"]} for f in contaminated[:EXAMPLES]]}
