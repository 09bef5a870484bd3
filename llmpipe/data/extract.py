"""HTML -> text with trafilatura, reusing what earlier runs on this run directory extracted.

A refresh re-reads every page of the crawl's view, but a page whose HTML it has extracted before
(an unchanged page, or a copy) takes the text from the run directory's extraction cache instead of
trafilatura, the slow step. The cache is keyed by the HTML and the extractor's settings and
version, so a reused text is the text trafilatura would give: the documents are the bytes a
from-scratch run makes, in the same order.

Workers only read the cache (a SQLite file, opened read-only, so a Slurm or Ray worker may read it
from a shared filesystem); each rank writes what it extracted to its own file, and the stage merges
those into the cache after the whole pipeline, in one transaction. A timeout is not cached.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import sqlite3
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.utils.typeshelper import StatHints

from llmpipe import io

_SCHEMA = "CREATE TABLE IF NOT EXISTS extractions (key TEXT PRIMARY KEY, text TEXT NOT NULL, sha256 TEXT NOT NULL)"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ExtractionCache:
    """key (sha256 of settings + HTML) -> extracted text ('' for a page with no main text)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def reader(self):
        """A lookup function `key -> text | None`; a row whose text fails its sha256 is a miss."""
        if not self.path.is_file():
            yield lambda key: None
            return
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            def lookup(key: str) -> str | None:
                row = db.execute("SELECT text, sha256 FROM extractions WHERE key = ?", (key,)).fetchone()
                return row[0] if row is not None and _sha256(row[0]) == row[1] else None

            yield lookup
        finally:
            db.close()

    def merge(self, folder: Path) -> int:
        """Add the entries of every `*.jsonl.gz` in `folder` (the ranks' new extractions; one replaces a
        damaged entry of its key); return how many."""
        files = sorted(Path(folder).glob("*.jsonl.gz")) if Path(folder).is_dir() else []
        if not files:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        try:
            with db:  # one transaction: a kill leaves the cache as it was
                db.execute(_SCHEMA)
                before = db.total_changes
                for path in files:
                    with gzip.open(path, "rt", encoding="utf-8") as f:
                        rows = (json.loads(line) for line in f)
                        db.executemany("INSERT OR REPLACE INTO extractions VALUES (?, ?, ?)",
                                       ((r["key"], r["text"], _sha256(r["text"])) for r in rows))
                return db.total_changes - before
        finally:
            db.close()


class CachedTrafilatura(Trafilatura):
    """datatrove's Trafilatura step that first looks each page up in an `ExtractionCache` (stat `reused`),
    and writes the pages it extracted to `new_folder/<rank>.jsonl.gz` for the stage to merge."""

    def __init__(self, cache: str | Path, new_folder: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.cache = str(cache)
        self.new_folder = str(new_folder)

    def cache_key(self, html: str) -> str:
        import trafilatura

        settings = {"trafilatura": trafilatura.__version__, "favour_precision": self.favour_precision,
                    "deduplicate": self.deduplicate, **self.kwargs}
        return _sha256(json.dumps(settings, sort_keys=True) + "\0" + html)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """The base step's loop (timeouts, crashed extractors and errors counted and skipped), with the lookup first."""
        new: list[dict] = []
        with ExtractionCache(self.cache).reader() as lookup, ExtractorSandbox(self.timeout) as extractor:
            for doc in data:
                self.stat_update(StatHints.total)
                with self.track_time():
                    key = self.cache_key(doc.text)
                    text = lookup(key)
                    if text is not None:
                        self.stat_update("reused")
                    else:
                        try:
                            text = extractor.process_document(doc.text, self.extract) or ""
                        except Exception as e:  # noqa: BLE001  the page is skipped and counted, as datatrove does
                            reason = "timeout" if isinstance(e, TimeoutError) else "broken_process" if isinstance(e, EOFError) else "clean_error"
                            self.stat_update(reason)
                            continue
                        new.append({"key": key, "text": text})
                    self.stat_update("extracted")
                doc.text = text
                if doc.text:
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped)
        io.write_bytes(Path(self.new_folder) / f"{rank:05d}.jsonl.gz",
                       gzip.compress("".join(json.dumps(e) + "\n" for e in new).encode(), mtime=0))
