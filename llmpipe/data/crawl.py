"""Stage `crawl`: raw HTML as gzipped WARC files, from a polite crawl or from existing WARC/WET files.

Three sources, in this order of precedence:
  * `crawl.warc_inputs`: existing WARC or WET files (local paths or fsspec URLs such as s3://),
    the way Common Crawl is consumed; they are copied into crawl/warc (WARC) or crawl/wet (WET).
  * `crawl.seeds`: a Scrapy crawl (robots.txt, per-host delay/concurrency, autothrottle,
    timeouts, redirect limit, body size limit, HTML only) run as a subprocess, because Twisted's
    reactor cannot be restarted inside one process. See `_crawl_scrapy.py`.
  * neither: a local `python -m pydoc` server on 127.0.0.1 is started and crawled.

Resuming. The WARC files are the crawl's state: every fetched page is a response record carrying
its crawl depth. A restarted crawl repairs a WARC truncated by a kill, takes every URL in the
WARCs as fetched, and rebuilds the frontier from the links of the fetched pages, so it works after
SIGKILL too (Scrapy's JOBDIR queues are only consistent after a graceful stop). URLs that failed
for good (robots, not HTML, too large, errors) are appended to crawl/.state/skipped.jsonl and not
retried. Each session writes a new warc/part-NNNNN.warc.gz, one gzip member per record, flushed
per record. The crawler process gets SIGTERM if the stage process dies (Linux), and the pydoc
server quits when its stdin closes, so a killed stage leaves nothing running; a resumed pydoc
crawl reuses the port in crawl/.state/pydoc_port, since the URLs in the WARC carry it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from llmpipe import console, io
from llmpipe.config import CrawlSection
from llmpipe.errors import UserError
from llmpipe.supervise import supervised

DEPTH_HEADER = "LLMPipe-Crawl-Depth"  # WARC extension header on response records: link hops from a seed
REDIRECTS_HEADER = "LLMPipe-Redirected-From"  # space-separated URLs that redirected to this page
PART_PATTERN = re.compile(r"^part-(\d{5})\.warc\.gz$")
GENERATION_FIELD = "llmpipe-refresh-generation"  # warcinfo field: which crawl (0) or refresh (1, 2...) wrote a part
PAGES_FILE = "pages.jsonl"  # the crawl's output that says what it has: URL, payload digest, record
HTML_TYPES = ("text/html", "application/xhtml+xml")


# --- URLs --------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """One spelling per page: lower-case scheme and host, no default port, no fragment,
    sorted query arguments, percent-encoding normalised, dot segments resolved, empty path -> /."""
    from w3lib.url import canonicalize_url

    url = canonicalize_url(url.strip(), keep_fragments=False)
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port
    if port and not ((parts.scheme == "http" and port == 80) or (parts.scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    path = parts.path or "/"
    if "/." in path:
        trailing = path.endswith("/")
        path = posixpath.normpath(path)
        path = path + "/" if trailing and path != "/" else path
    return urlunsplit((parts.scheme.lower(), host, path, parts.query, ""))


def netloc(url: str) -> str:
    return urlsplit(normalize_url(url)).netloc


def host_allowed(url: str, allowed_hosts: list[str]) -> bool:
    """`host:port` entries match exactly; bare host names match that host and its subdomains, any port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False
    host, loc = (parts.hostname or "").lower(), parts.netloc.lower()
    for entry in allowed_hosts:
        entry = entry.lower()
        if ":" in entry:
            if loc == entry:
                return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


@dataclass
class TrapGuard:
    """Rules against crawl traps (endless generated links). `check` returns a reason or None.

    Breadth-first order and `max_depth` already keep a trap from starving shallow pages; these
    rules stop the classic shapes early: very long URLs, very deep paths, a path segment
    repeating (relative links resolved against themselves: /a/b/a/b/...), and one path with
    endless query variants (calendars, sort orders, session ids).
    """

    max_url_length: int = 512
    max_path_segments: int = 12
    max_segment_repeats: int = 2
    max_query_variants: int = 100
    _variants: Counter = field(default_factory=Counter)

    def check(self, url: str, record: bool = True) -> str | None:
        parts = urlsplit(url)
        segments = [s for s in parts.path.split("/") if s]
        if len(url) > self.max_url_length:
            return "trap_url_length"
        if len(segments) > self.max_path_segments:
            return "trap_path_depth"
        if segments and max(Counter(segments).values()) > self.max_segment_repeats:
            return "trap_repeated_segment"
        if parts.query:
            key = f"{parts.netloc}{parts.path}"
            if self._variants[key] >= self.max_query_variants:
                return "trap_query_variants"
            if record:
                self._variants[key] += 1
        return None


# --- WARC files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarcPage:
    """A page of the WARCs: a response record, or a revisit record with the payload of the record it refers to."""

    url: str
    depth: int
    redirected_from: tuple[str, ...]
    content_type: str
    body: bytes
    record_id: str = ""
    source_id: str = ""  # the response record holding the payload: this one, or the one a revisit refers to
    source_file: str = ""  # that record's WARC file, inside the WARC folder
    digest: str = ""  # WARC-Payload-Digest (sha1, base32), as every WARC tool writes it
    generation: int = 0  # the crawl (0) or refresh (1, 2, ...) that visited the page
    etag: str = ""  # validators of the response, for the next refresh's conditional request
    last_modified: str = ""
    revisit: bool = False


def warc_parts(warc_dir: Path, given: bool = False) -> list[Path]:
    """The crawler's part files, or with `given` every WARC file (those `crawl.warc_inputs` staged)."""
    if given:
        return sorted(p for p in Path(warc_dir).glob("*") if re.search(r"\.warc(\.gz)?$", p.name, re.IGNORECASE))
    return sorted(p for p in Path(warc_dir).glob("part-*.warc.gz") if PART_PATTERN.match(p.name))


def complete_gzip_length(path: Path, chunk_size: int = 1 << 20) -> int:
    """Bytes of `path` that form complete gzip members (our WARCs are one member per record)."""
    good_end, offset = 0, 0
    inflater = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            data = chunk
            while data:
                try:
                    inflater.decompress(data)
                except zlib.error:
                    return good_end
                if inflater.eof:
                    consumed = len(data) - len(inflater.unused_data)
                    offset += consumed
                    good_end = offset
                    data = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    offset += len(data)
                    data = b""
    return good_end


def repair_warc(path: Path) -> int:
    """Cut a WARC file after its last complete record (a killed writer leaves a partial one).

    Returns the number of bytes removed. A file without one complete record is deleted.
    """
    size = path.stat().st_size
    good_end = complete_gzip_length(path)
    if good_end == 0:
        path.unlink()
        return size
    if good_end < size:
        with open(path, "rb+") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return size - good_end


def part_generation(path: Path) -> int:
    """The refresh generation a WARC file's warcinfo record names (0: a first crawl, or a WARC of another tool)."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "warcinfo":
                for line in record.content_stream().read().decode("utf-8", "replace").splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() == GENERATION_FIELD and value.strip().isdigit():
                        return int(value.strip())
            return 0
    return 0


def iter_warc_pages(warc_dir: Path, given: bool = False) -> Iterator[WarcPage]:
    """The pages of every part file (or given WARC file), in crawl order: response records, and revisit
    records with the payload of the response they refer to."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.utils import Digester

    payloads: dict[str, tuple[bytes, str, str, str]] = {}  # record id -> (body, content type, file, digest)
    for path in warc_parts(warc_dir, given):
        generation = part_generation(path)
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type not in ("response", "revisit"):
                    continue
                headers, http = record.rec_headers, record.http_headers
                record_id = headers.get_header("WARC-Record-ID")
                if record.rec_type == "response":
                    body = record.content_stream().read()
                    digest = headers.get_header("WARC-Payload-Digest")
                    if not digest:
                        digester = Digester("sha1")
                        digester.update(body)
                        digest = str(digester)
                    content_type = (http.get_header("Content-Type") or "") if http else ""
                    payloads[record_id] = (body, content_type, path.name, digest)
                    source_id = record_id
                else:
                    source_id = headers.get_header("WARC-Refers-To")
                    if source_id not in payloads:
                        continue  # refers to a record of another archive
                body, content_type, source_file, digest = payloads[source_id]
                yield WarcPage(
                    url=headers.get_header("WARC-Target-URI"),
                    depth=int(headers.get_header(DEPTH_HEADER) or 0),
                    redirected_from=tuple((headers.get_header(REDIRECTS_HEADER) or "").split()),
                    content_type=content_type, body=body, record_id=record_id, source_id=source_id,
                    source_file=source_file, digest=digest, generation=generation,
                    etag=(http.get_header("ETag") or "") if http else "",
                    last_modified=(http.get_header("Last-Modified") or "") if http else "",
                    revisit=record.rec_type == "revisit")


def crawl_view(pages: list[WarcPage], generation: int | None = None) -> list[dict]:
    """The pages the crawl has now (of `pages`, those of `iter_warc_pages`): those its last generation (or
    `generation`) visited, each naming the response record that holds its payload, sorted by URL. A page
    a refresh did not find again is not in it; an unchanged page names the record of the crawl that first stored it."""
    if generation is None:
        generation = max((page.generation for page in pages), default=0)
    view = [{"url": page.url, "digest": page.digest, "warc": page.source_file, "record": page.source_id}
            for page in pages if page.generation == generation]
    return sorted(view, key=lambda entry: (entry["url"], entry["record"]))


def view_changes(before: list[dict], after: list[dict]) -> dict[str, int]:
    """Pages new, changed, unchanged and removed from one view of the crawl to the next."""
    old = {entry["url"]: entry["digest"] for entry in before}
    new = {entry["url"]: entry["digest"] for entry in after}
    return {"new": sum(url not in old for url in new),
            "changed": sum(url in old and old[url] != digest for url, digest in new.items()),
            "unchanged": sum(old.get(url) == digest for url, digest in new.items()),
            "removed": sum(url not in new for url in old)}


def read_view(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def warc_summary(warc_dir: Path, given: bool = False, pages: list[WarcPage] | None = None,
                 generation: int | None = None) -> dict:
    """Counts of the WARCs: the pages of the view (`crawl_view`), the payloads stored. `pages`: read already."""
    files = warc_parts(warc_dir, given)
    pages = list(iter_warc_pages(warc_dir, given)) if pages is None else pages
    view = crawl_view(pages, generation)
    stored = [page for page in pages if not page.revisit]
    return {"pages": len(view), "unique_urls": len({normalize_url(entry["url"]) for entry in view}),
            "html_bytes": sum(len(page.body) for page in stored), "payload_records": len(stored),
            "warc_files": len(files), "warc_bytes": sum(p.stat().st_size for p in files)}


# --- refreshing --------------------------------------------------------------------------------


def refresh_generation(cfg: CrawlSection, stage_dir: Path) -> int | None:
    """The generation a run with this config crawls: None without `crawl.refresh` (the cache key is the
    config's); else the last finished one while it is younger than `refresh_min_age_s`, the next one
    once it is older, and an interrupted refresh's until it finishes. Part of the crawl's cache key."""
    if cfg.refresh == "never" or cfg.warc_inputs:
        return None
    stage_dir = Path(stage_dir)
    state = stage_dir / ".state" / "refresh.json"
    if state.is_file():
        finished = json.loads(state.read_text())
        last, finished_at = finished["generation"], finished["finished_at"]
    elif (stage_dir / "manifest.json").is_file():  # crawled before refresh was turned on
        last, finished_at = 0, (stage_dir / "manifest.json").stat().st_mtime
    else:
        return 0
    started = [part_generation(path) for path in warc_parts(stage_dir / "warc")]
    if max(started, default=0) > last or time.time() - finished_at >= cfg.refresh_min_age_s:
        return last + 1
    return last


# --- running a crawl ---------------------------------------------------------------------------


@dataclass
class CrawlJob:
    """Everything the crawler subprocess needs, written to <state_dir>/job.json."""

    seeds: list[str]
    allowed_hosts: list[str]
    warc_dir: str
    state_dir: str
    max_pages: int = 200
    max_depth: int = 3
    delay_s: float = 0.0
    concurrency_per_host: int = 4
    autothrottle: bool = True
    timeout_s: float = 10.0
    max_redirects: int = 5
    retries: int = 1
    max_body_bytes: int = 5_000_000
    obey_robots: bool = True
    user_agent: str = "llmpipe-crawler"
    exclude_url_patterns: list[str] = field(default_factory=list)
    max_url_length: int = 512
    max_path_segments: int = 12
    max_segment_repeats: int = 2
    max_query_variants: int = 100
    generation: int = 0  # 0: a crawl; N > 0: refresh N, which revisits with conditional requests

    @classmethod
    def from_section(cls, cfg: CrawlSection, seeds: list[str], warc_dir: Path, state_dir: Path,
                     extra_excludes: list[str] = (), generation: int = 0) -> "CrawlJob":
        seeds = [normalize_url(s) for s in seeds]
        return cls(
            seeds=seeds, allowed_hosts=list(cfg.allowed_hosts) or sorted({netloc(s) for s in seeds}),
            warc_dir=str(warc_dir), state_dir=str(state_dir), max_pages=cfg.max_pages,
            max_depth=cfg.max_depth, delay_s=cfg.delay_s, concurrency_per_host=cfg.concurrency_per_host,
            autothrottle=cfg.autothrottle, timeout_s=cfg.timeout_s, max_redirects=cfg.max_redirects,
            retries=cfg.retries, max_body_bytes=cfg.max_body_bytes, obey_robots=cfg.obey_robots,
            user_agent=cfg.user_agent, exclude_url_patterns=[*cfg.exclude_url_patterns, *extra_excludes],
            max_url_length=cfg.max_url_length, max_path_segments=cfg.max_path_segments,
            max_segment_repeats=cfg.max_segment_repeats, max_query_variants=cfg.max_query_variants,
            generation=generation)

    def write(self) -> Path:
        path = Path(self.state_dir) / "job.json"
        io.write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "CrawlJob":
        return cls(**json.loads(Path(path).read_text()))


def crawler_command(job_path: Path) -> list[str]:
    return [sys.executable, "-m", "llmpipe.data._crawl_scrapy", str(job_path)]


def run_crawl(job: CrawlJob, timeout_s: float | None = None) -> dict:
    """Run (or resume) the crawl in a subprocess; return that session's summary.

    The child is terminated (SIGTERM: Scrapy stops gracefully) if this process is interrupted, and
    gets SIGTERM from the kernel if this process dies, so a killed stage never leaves a crawler
    writing to the WARC behind a restarted one.
    """
    Path(job.state_dir).mkdir(parents=True, exist_ok=True)
    Path(job.warc_dir).mkdir(parents=True, exist_ok=True)
    job_path = job.write()
    before = {p.name for p in Path(job.state_dir).glob("session-*.json")}
    log = console.subprocess_output()  # Scrapy's log goes to the stage's log, not the terminal
    with supervised(crawler_command(job_path), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT if log else None) as proc:
        rc = proc.wait(timeout=timeout_s)
    if rc != 0:
        raise RuntimeError(f"crawler subprocess failed with exit code {rc} (job {job_path})")
    new = sorted(p for p in Path(job.state_dir).glob("session-*.json") if p.name not in before)
    return json.loads(new[-1].read_text()) if new else {}


# --- existing WARC / WET inputs ----------------------------------------------------------------


def _input_kind(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    return "wet" if ".wet" in name else "warc"


def ingest_warc_inputs(inputs: list[str], out_dir: Path) -> dict:
    """Copy WARC files to out_dir/warc and WET files to out_dir/wet byte for byte, streaming via fsspec.

    Compression is kept as it is (Common Crawl's per-record gzip stays seekable). A copy that was
    completed by an earlier, interrupted run of the stage is kept.
    """
    import fsspec

    counts = Counter()
    for url, target in zip(inputs, staged_paths(inputs, out_dir)):
        marker = out_dir / ".state" / f"{target.name}.done"
        if not (target.is_file() and marker.is_file()):
            with fsspec.open(url, "rb") as src, io.atomic_path(target) as tmp, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            io.write_text(marker, url)
        counts[f"{target.parent.name}_files"] += 1
        counts["input_bytes"] += target.stat().st_size
    return dict(counts)


def staged_paths(inputs: list[str], out_dir: Path) -> list[Path]:
    """Where each input is copied: under its own name, so the documents (which name their WARC file)
    are the same bytes whether a WARC was crawled in this run or given; numbered `input-00000-...`
    in the config's order only when two inputs share a name."""
    kinds, names = [], []
    for url in inputs:
        kind = _input_kind(url)
        base = url.rstrip("/").rsplit("/", 1)[-1]
        stem = re.sub(r"(\.(warc|wet))?(\.gz)?$", "", base, flags=re.IGNORECASE)
        suffix = f".{kind}.gz" if base.lower().endswith(".gz") else f".{kind}"
        kinds.append(kind)
        names.append(f"{re.sub(r'[^A-Za-z0-9._-]', '_', stem)}{suffix}")
    unique = len({(k, n) for k, n in zip(kinds, names)}) == len(names)
    return [out_dir / kind / (name if unique else f"input-{i:05d}-{name}")
            for i, (kind, name) in enumerate(zip(kinds, names))]


# --- the stage ---------------------------------------------------------------------------------


RAW_INPUT_FOLDERS = ("warc", "wet")  # the crawl's outputs: what every later stage is made from


def crawl_stage(ctx, cfg: CrawlSection) -> dict:
    out_dir = Path(ctx.out_dir)
    state_dir = out_dir / ".state"
    warc_dir = ctx.run_dir.warc_dir
    if cfg.warc_inputs:
        counts = ingest_warc_inputs(list(cfg.warc_inputs), out_dir)
        pages = list(iter_warc_pages(warc_dir, given=True))
        summary = warc_summary(warc_dir, given=True, pages=pages)  # the counts a crawl that wrote these WARCs has
        _write_view(out_dir, crawl_view(pages))
        _log_raw_inputs(ctx, out_dir)
        return {**counts, "pages_fetched": summary["pages"], "unique_urls": summary["unique_urls"],
                "html_bytes": summary["html_bytes"], "source": "warc_inputs", "inputs": list(cfg.warc_inputs)}

    generation = refresh_generation(cfg, out_dir) or 0
    t0 = time.perf_counter()
    if cfg.seeds:
        job = CrawlJob.from_section(cfg, list(cfg.seeds), warc_dir, state_dir, generation=generation)
        session = run_crawl(job)
        source = "seeds"
    else:
        session, job = _crawl_pydoc(cfg, warc_dir, state_dir, generation)
        source = "pydoc"
    wall = time.perf_counter() - t0
    pages = list(iter_warc_pages(warc_dir))  # read once: the view, the counts, the refresh's changes
    view = crawl_view(pages, job.generation)
    if not view:
        raise CrawlFetchedNothing(_why_nothing(job, _skipped_all_sessions(state_dir, job.generation)))
    _write_view(out_dir, view)
    summary = warc_summary(warc_dir, pages=pages, generation=job.generation)
    fetched = session.get("pages_written", 0)
    _log_raw_inputs(ctx, out_dir)
    counts = {
        "pages_fetched": summary["pages"],
        "pages_this_session": fetched,
        "unique_urls": summary["unique_urls"],
        "html_bytes": summary["html_bytes"],
        "warc_bytes": summary["warc_bytes"],
        "warc_files": summary["warc_files"],
        "timing": {"pages_per_s": round(fetched / wall, 3) if wall > 0 else 0.0},  # this run's: MLflow only
        "skipped": _skipped_all_sessions(state_dir, job.generation),
        "source": source,
        "seeds": job.seeds,
        "allowed_hosts": job.allowed_hosts,
    }
    if cfg.refresh != "never":
        counts["refresh"] = {"generation": job.generation, "payload_records": summary["payload_records"],
                             **(view_changes(crawl_view(pages, job.generation - 1), view)
                                if job.generation else {"new": len(view)})}
        io.write_json(state_dir / "refresh.json", {"generation": job.generation, "finished_at": time.time()})
    return counts


def _write_view(out_dir: Path, view: list[dict]) -> None:
    io.write_text(out_dir / PAGES_FILE, "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in view))


def _log_raw_inputs(ctx, out_dir: Path) -> None:
    """The WARC (and WET) files on the stage's MLflow run: the raw inputs `llmpipe reproduce` starts from."""
    for folder in RAW_INPUT_FOLDERS:
        if (out_dir / folder).is_dir():
            ctx.tracker.log_artifact(out_dir / folder, folder)


class CrawlFetchedNothing(UserError):
    """A crawl that kept no page: every later stage would fail on an empty corpus."""


def _why_nothing(job: CrawlJob, skipped: dict[str, int]) -> str:
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none: no link was followed"
    return (f"the crawl kept no page from {', '.join(job.seeds)} (skipped, by reason: {reasons}); "
            f"check crawl.seeds and crawl.allowed_hosts ({', '.join(job.allowed_hosts)})")


def _skipped_all_sessions(state_dir: Path, generation: int = 0) -> dict[str, int]:
    """Skip reasons summed over every session of this crawl or refresh (a resumed one has several)."""
    total: Counter = Counter()
    for path in sorted(state_dir.glob("session-*.json")):
        session = json.loads(path.read_text())
        if session.get("generation", 0) == generation:
            total.update(session.get("skipped", {}))
    return dict(total)


def _crawl_pydoc(cfg: CrawlSection, warc_dir: Path, state_dir: Path, generation: int = 0) -> tuple[dict, CrawlJob]:
    """Crawl a local pydoc server. Its port is kept in .state/pydoc_port so a resumed crawl
    (whose WARC URLs carry that port) gets the same one; if it is taken, the crawl starts over."""
    from llmpipe.data.pydoc_server import exclusion_patterns, pydoc_server

    port_file = state_dir / "pydoc_port"
    port = int(port_file.read_text()) if port_file.is_file() else 0
    if port and not _port_free(port):
        _reset_crawl_state(warc_dir, state_dir)
        port, generation = 0, 0
    with pydoc_server(port=port, site_packages=cfg.pydoc_site_packages) as base:
        state_dir.mkdir(parents=True, exist_ok=True)
        io.write_text(port_file, str(urlsplit(base).port))
        job = CrawlJob.from_section(cfg, [base], warc_dir, state_dir,
                                    extra_excludes=exclusion_patterns(list(cfg.pydoc_exclude_modules)),
                                    generation=generation)
        return run_crawl(job), job


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pydoc's server does: TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reset_crawl_state(warc_dir: Path, state_dir: Path) -> None:
    for path in warc_parts(warc_dir):
        path.unlink()
    for path in state_dir.glob("*"):
        if path.is_file():
            path.unlink()


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("crawl")
