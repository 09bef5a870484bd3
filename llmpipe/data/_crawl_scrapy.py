"""The crawler process: `python -m llmpipe.data._crawl_scrapy <state_dir>/job.json`.

Scrapy does the crawling machinery: robots.txt (RobotsTxtMiddleware), per-host concurrency,
delay and autothrottle, timeouts, redirects (RedirectMiddleware, REDIRECT_MAX_TIMES), the body
size limit (DOWNLOAD_MAXSIZE cancels a download once the Content-Length or the bytes received
pass it) and retries. This module adds what a pretraining crawl needs on top:

  * `PageSpider` issues its requests itself, level by level: a depth's links are scheduled only
    when the whole depth is done, in URL order, and never more than the page budget has room for
    (pages written + pages in flight <= max_pages); a failed page's room goes to the next URL.
    So two crawls of a static site keep the same pages however their responses interleave: the
    first `max_pages` pages that succeed, in (depth, URL) order.
  * `FrontierGuard` (downloader middleware, first in the chain): host allow-list for every
    request including redirect hops, fetch-once (a URL already in the WARC is never downloaded
    again).
  * `headers_received`: a response whose Content-Type is not HTML is cut off after its headers.
  * `WarcOutput`: each fetched page as a gzipped WARC response + request record pair.
  * `CrawlState.load`: the resume logic (see llmpipe/data/crawl.py).

It runs as its own process because Twisted's reactor cannot be restarted in one process.
"""

from __future__ import annotations

import heapq
import http.client
import json
import re
import sys
import time
from collections import Counter
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

import scrapy
from scrapy import signals
from scrapy.crawler import CrawlerProcess
from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware
from scrapy.exceptions import CloseSpider, IgnoreRequest, StopDownload
from scrapy.http import HtmlResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from twisted.internet.defer import Deferred

from llmpipe.data.crawl import (
    DEPTH_HEADER,
    GENERATION_FIELD,
    HTML_TYPES,
    PART_PATTERN,
    REDIRECTS_HEADER,
    CrawlJob,
    TrapGuard,
    WarcPage,
    host_allowed,
    iter_warc_pages,
    normalize_url,
    repair_warc,
    warc_parts,
)
from llmpipe.progress import progress

# reasons that are not recorded in skipped.jsonl: the URL may be fetched by a later session
_TRANSIENT = {"budget", "already_fetched"}
REVISIT_NOT_MODIFIED = "http://netpreserve.org/warc/1.1/revisit/server-not-modified"


class Skip(IgnoreRequest):
    """A request the crawl decided not to download, with the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- state -------------------------------------------------------------------------------------


class CrawlState:
    """What has been fetched, skipped, scheduled and reserved; shared by spider and middleware."""

    def __init__(self, job: CrawlJob):
        self.job = job
        self.state_dir = Path(job.state_dir)
        self.warc_dir = Path(job.warc_dir)
        self.fetched: set[str] = set()  # normalised URLs with a record of this generation in the WARCs
        self.known: dict[str, WarcPage] = {}  # a refresh: each URL's latest page of earlier generations
        self.skipped: dict[str, str] = {}  # URL -> reason, this session and earlier ones
        self.seen: set[str] = set()  # fetched, skipped, or already scheduled in this session
        self.reserved: set[str] = set()  # root URLs of requests in flight (one page each)
        self.queue: list[tuple[int, str]] = []  # (depth, url) accepted, not yet requested: a heap
        self.level = 0  # the depth being fetched
        self.trap = TrapGuard(job.max_url_length, job.max_path_segments, job.max_segment_repeats,
                              job.max_query_variants)
        self.excludes = [re.compile(p) for p in job.exclude_url_patterns]
        self.counts: Counter = Counter()  # skip reasons of this session
        self.pages_written = 0
        self.pages_unchanged = 0  # a refresh: pages recorded as revisits (no payload stored again)
        self.frontier: list[tuple[int, str]] = []  # (depth, url) to schedule at start
        self.links = LinkExtractor()  # default deny_extensions: images, archives, binaries ...
        self._skip_log = None

    # resume ---------------------------------------------------------------------------------

    def load(self) -> None:
        self.warc_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for path in warc_parts(self.warc_dir):
            removed = repair_warc(path)
            if removed:
                print(f"crawl: repaired {path.name}: cut {removed} bytes of a partial record", file=sys.stderr)
        skip_path = self.state_dir / "skipped.jsonl"
        if skip_path.is_file():
            for line in skip_path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a kill mid-line
                    continue
                if entry.get("generation", 0) == self.job.generation:  # a refresh retries what failed before
                    self.skipped[entry["url"]] = entry["reason"]
        best: dict[str, int] = {}
        pages = []
        for page in iter_warc_pages(self.warc_dir):
            if page.generation == self.job.generation:
                pages.append(page)
            elif page.generation < self.job.generation:
                self.known[normalize_url(page.url)] = page
        for page in pages:
            self.fetched.add(normalize_url(page.url))
            self.seen.update(normalize_url(u) for u in page.redirected_from)
            self.trap.check(normalize_url(page.url))
        self.seen |= self.fetched | set(self.skipped)
        for url in self.job.seeds:
            best.setdefault(normalize_url(url), 0)
        for page in pages:
            if page.depth + 1 > self.job.max_depth:
                continue
            response = HtmlResponse(url=page.url, body=page.body,
                                    headers={"Content-Type": page.content_type or "text/html"})
            for link in self.links.extract_links(response):
                url = normalize_url(link.url)
                if url not in best or best[url] > page.depth + 1:
                    best[url] = page.depth + 1
        self.frontier = sorted((depth, url) for url, depth in best.items() if url not in self.seen)

    # decisions ------------------------------------------------------------------------------

    def rejection(self, url: str, depth: int) -> str | None:
        """Why a discovered link is not scheduled, or None to schedule it."""
        if depth > self.job.max_depth:
            return "depth"
        if not host_allowed(url, self.job.allowed_hosts):
            return "offsite"
        if any(p.search(url) for p in self.excludes):
            return "excluded"
        return self.trap.check(url)

    def budget_left(self) -> int:
        return self.job.max_pages - len(self.fetched) - len(self.reserved)

    def skip(self, url: str, reason: str) -> None:
        self.counts[reason] += 1
        if reason in _TRANSIENT or url in self.skipped:
            return
        self.skipped[url] = reason
        if self._skip_log is None:
            self._skip_log = open(self.state_dir / "skipped.jsonl", "a")
        self._skip_log.write(json.dumps({"url": url, "reason": reason, "generation": self.job.generation}) + "\n")
        self._skip_log.flush()

    def close(self) -> None:
        if self._skip_log is not None:
            self._skip_log.close()


# --- WARC output -------------------------------------------------------------------------------


class WarcOutput:
    """One gzipped WARC file per crawl session, each record its own gzip member, flushed per page."""

    def __init__(self, warc_dir: Path, user_agent: str, generation: int = 0):
        indices = [int(PART_PATTERN.match(p.name).group(1)) for p in warc_parts(warc_dir)]
        self.path = warc_dir / f"part-{max(indices, default=-1) + 1:05d}.warc.gz"
        self.user_agent = user_agent
        self.generation = generation
        self._file = None
        self._writer = None

    def _open(self) -> None:
        from warcio.warcwriter import WARCWriter

        self._file = open(self.path, "wb")
        self._writer = WARCWriter(self._file, gzip=True)
        info = self._writer.create_warcinfo_record(self.path.name, {
            "software": "llmpipe crawler (Scrapy)", "format": "WARC File Format 1.1",
            "http-header-user-agent": self.user_agent, GENERATION_FIELD: str(self.generation)})
        self._writer.write_record(info)
        self._file.flush()

    def write_page(self, response, depth: int, redirected_from: list[str], revisit_of: WarcPage | None = None) -> None:
        """A response record, or with `revisit_of` a revisit record: the response's headers and a reference
        to the earlier record whose payload it has (`server-not-modified` for a 304)."""
        from warcio.statusandheaders import StatusAndHeaders

        if self._writer is None:
            self._open()
        status = f"{response.status} {http.client.responses.get(response.status, '')}".strip()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, values in response.headers.items()
                   for v in values if k.lower() not in (b"content-encoding", b"transfer-encoding", b"content-length")]
        if revisit_of is None:
            headers.append(("Content-Length", str(len(response.body))))  # the body is stored decoded
        protocol = getattr(response, "protocol", None) or "HTTP/1.1"
        warc_headers = {DEPTH_HEADER: str(depth)}
        if redirected_from:
            warc_headers[REDIRECTS_HEADER] = " ".join(redirected_from)
        http_headers = StatusAndHeaders(status, headers, protocol=protocol)
        if revisit_of is None:
            record = self._writer.create_warc_record(response.url, "response", payload=BytesIO(response.body),
                                                     http_headers=http_headers, warc_headers_dict=warc_headers)
            record.rec_headers.add_header("WARC-Identified-Payload-Type", "text/html")
        else:
            warc_headers["WARC-Refers-To"] = revisit_of.source_id
            record = self._writer.create_revisit_record(response.url, revisit_of.digest, revisit_of.url, "",
                                                        http_headers=http_headers, warc_headers_dict=warc_headers)
            record.rec_headers.remove_header("WARC-Refers-To-Date")  # the earlier record's id says which one
            if response.status == 304:
                record.rec_headers.replace_header("WARC-Profile", REVISIT_NOT_MODIFIED)

        parts = urlsplit(response.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        req_headers = [("Host", parts.netloc)] + [
            (k.decode("latin-1"), v.decode("latin-1")) for k, values in response.request.headers.items() for v in values]
        request = self._writer.create_warc_record(
            response.url, "request", payload=BytesIO(b""),
            http_headers=StatusAndHeaders(f"{response.request.method} {target} HTTP/1.1", req_headers,
                                          is_http_request=True),
            warc_headers_dict={"WARC-Concurrent-To": record.rec_headers.get_header("WARC-Record-ID")})
        self._writer.write_record(record)
        self._writer.write_record(request)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --- Scrapy components -------------------------------------------------------------------------


class FrontierGuard:
    """Downloader middleware that runs before all others, for every request and redirect hop."""

    def process_request(self, request, spider=None):
        state = _STATE
        if request.meta.get("dont_obey_robotstxt") or urlsplit(request.url).path == "/robots.txt":
            return None  # robots.txt fetches are bookkeeping, not pages
        url = normalize_url(request.url)
        if not host_allowed(url, state.job.allowed_hosts):
            raise Skip("offsite")
        if url in state.fetched:
            raise Skip("already_fetched")
        root = request.meta.get("root_url", url)
        if root not in state.reserved:
            if state.budget_left() <= 0:
                raise Skip("budget")
            state.reserved.add(root)
        return None


class RobotsTxt(RobotsTxtMiddleware):
    """Scrapy's robots.txt middleware, with every request that waits for robots.txt given the parser.

    Scrapy 2.19's hands the parser to the first request waiting on the shared Deferred and None
    ("no robots.txt: allow all") to the others (`Deferred.asFuture` consumes the result), so the
    third request of a burst to a new host ignored `Disallow`. Here each waiter has its own Deferred.
    """

    def __init__(self, crawler):
        super().__init__(crawler)
        self._waiters: dict[str, list[Deferred]] = {}

    async def robot_parser(self, request):
        netloc = urlparse_cached(request).netloc
        if isinstance(self._parsers.get(netloc), Deferred):  # another request is fetching robots.txt
            mine: Deferred = Deferred()
            self._waiters.setdefault(netloc, []).append(mine)
            return await maybe_deferred_to_future(mine)
        parser = await super().robot_parser(request)  # fetches robots.txt, or has its parser
        for waiter in self._waiters.pop(netloc, []):
            waiter.callback(parser)
        return parser


_STATE: CrawlState | None = None  # the one crawl of this process (set in main)


class PageSpider(scrapy.Spider):
    name = "llmpipe"

    def __init__(self, state: CrawlState, max_in_flight: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.state = state
        self.max_in_flight = max_in_flight
        self.warc = WarcOutput(state.warc_dir, state.job.user_agent, state.job.generation)
        self.started = time.time()
        self.bar = progress(state.job.max_pages, "crawl", unit="page", initial=len(state.fetched))

    @classmethod
    def from_crawler(cls, crawler, *args, **kwargs):
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.on_headers, signal=signals.headers_received)
        crawler.signals.connect(spider.on_dropped, signal=signals.request_dropped)
        return spider

    async def start(self):
        for depth, url in self.state.frontier:
            reason = self.state.rejection(url, depth) if depth > 0 else None
            self.state.seen.add(url)
            if reason:
                self.state.skip(url, reason)
                continue
            heapq.heappush(self.state.queue, (depth, url))
        for request in self._next_requests():
            yield request

    def _next_requests(self) -> list[scrapy.Request]:
        """As many queued URLs as the budget and the concurrency have room for, in (depth, URL)
        order; the next depth only once nothing of this one is in flight."""
        state, requests = self.state, []
        while state.queue and state.budget_left() > 0 and len(state.reserved) < self.max_in_flight:
            depth, url = state.queue[0]
            if state.reserved and depth > state.level:
                break  # the level's last pages may still fail and give their room to its next URLs
            heapq.heappop(state.queue)
            state.level = depth
            if url in state.fetched:  # a redirect target fetched meanwhile
                continue
            state.reserved.add(url)
            requests.append(self._request(url, depth))
        return requests

    def _schedule_next(self) -> None:
        """Called where a page's room was given back outside a callback's output."""
        for request in self._next_requests():
            self.crawler.engine.crawl(request)

    def _request(self, url: str, depth: int) -> scrapy.Request:
        """A refresh asks for a page it has with its validators: an unchanged page costs a 304, no body."""
        known, headers = self.state.known.get(url), {}
        if known is not None:
            if known.etag:
                headers["If-None-Match"] = known.etag
            if known.last_modified:
                headers["If-Modified-Since"] = known.last_modified
        return scrapy.Request(url, callback=self.parse, errback=self.on_error, priority=-depth, headers=headers,
                              meta={"crawl_depth": depth, "root_url": url, "handle_httpstatus_list": [304]})

    # responses ------------------------------------------------------------------------------

    def parse(self, response):
        state, depth = self.state, response.meta["crawl_depth"]
        root = response.meta["root_url"]
        url = normalize_url(response.url)
        known = state.known.get(url)
        if response.status == 304 and known is not None:  # not modified: the links are those of the page we have
            unchanged = known
            response = HtmlResponse(url=response.url, body=known.body, headers=response.headers,
                                    request=response.request, status=304)
        elif not isinstance(response, HtmlResponse):
            state.reserved.discard(root)
            state.skip(root, "not_html" if response.status != 304 else "http_304")
            yield from self._next_requests()
            return
        else:
            unchanged = known if known is not None and known.digest == _payload_digest(response.body) else None
        redirected_from = [u for u in response.meta.get("redirect_urls", []) if normalize_url(u) != url]
        self.warc.write_page(response, depth, redirected_from, revisit_of=unchanged)
        state.pages_unchanged += unchanged is not None
        state.reserved.discard(root)
        state.fetched.add(url)
        state.seen.add(url)
        state.seen.update(normalize_url(u) for u in redirected_from)
        state.pages_written += 1
        self.bar.update()
        if len(state.fetched) >= state.job.max_pages:
            raise CloseSpider("page_budget")
        if depth + 1 <= state.job.max_depth:
            for link in state.links.extract_links(response):
                target = normalize_url(link.url)
                if target in state.seen:
                    continue
                state.seen.add(target)
                reason = state.rejection(target, depth + 1)
                if reason:
                    state.skip(target, reason)
                    continue
                heapq.heappush(state.queue, (depth + 1, target))
        yield from self._next_requests()

    def on_error(self, failure):
        request = failure.request
        root = request.meta.get("root_url", request.url)
        self.state.reserved.discard(root)
        self.state.skip(root, _classify(failure))
        return self._next_requests()

    def on_headers(self, headers, body_length, request, spider):
        if request.meta.get("dont_obey_robotstxt") or urlsplit(request.url).path == "/robots.txt":
            return
        content_type = (headers.get(b"Content-Type") or b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type and content_type not in HTML_TYPES:
            raise StopDownload(fail=True)

    def on_dropped(self, request, spider):
        """The scheduler's duplicate filter dropped a request: a redirect back to a visited URL."""
        root = request.meta.get("root_url")
        if root is not None and root in self.state.reserved:
            self.state.reserved.discard(root)
            self.state.skip(root, "redirect_loop")
            self._schedule_next()

    def closed(self, reason):
        self.bar.close()
        self.warc.close()
        self.state.close()
        summary = {"pages_written": self.state.pages_written, "pages_unchanged": self.state.pages_unchanged,
                   "pages_total": len(self.state.fetched), "generation": self.state.job.generation,
                   "skipped": dict(self.state.counts), "close_reason": reason,
                   "elapsed_s": round(time.time() - self.started, 3), "warc_file": self.warc.path.name}
        n = len(list(self.state.state_dir.glob("session-*.json")))
        (self.state.state_dir / f"session-{n:05d}.json").write_text(json.dumps(summary, indent=2))


def _payload_digest(body: bytes) -> str:
    """As warcio writes WARC-Payload-Digest: sha1, base32."""
    from warcio.utils import Digester

    digester = Digester("sha1")
    digester.update(body)
    return str(digester)


def _classify(failure) -> str:
    """A failed request -> a short reason for the manifest."""
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TCPTimedOutError, TimeoutError

    exc = failure.value
    if isinstance(exc, Skip):
        return exc.reason
    if isinstance(exc, HttpError):
        return f"http_{exc.response.status}"
    if isinstance(exc, StopDownload):
        return "not_html"
    if isinstance(exc, IgnoreRequest):
        text = str(exc).lower()
        if "robots.txt" in text:
            return "robots"
        if "redirect" in text:
            return "redirect_limit"
        return "ignored"
    if isinstance(exc, CancelledError) or "Cancelled" in type(exc).__name__ or "max size" in str(exc).lower():
        return "too_large"
    if isinstance(exc, (TimeoutError, TCPTimedOutError)):
        return "timeout"
    if isinstance(exc, (ConnectionRefusedError, DNSLookupError)):
        return "connection_error"
    name = type(exc).__name__
    if "Timeout" in name:
        return "timeout"
    if "maxsize" in str(exc).lower() or "size" in name.lower():
        return "too_large"
    return "error_" + re.sub(r"\W+", "_", name).lower()


def settings_for(job: CrawlJob) -> dict:
    return {
        "USER_AGENT": job.user_agent,
        "ROBOTSTXT_OBEY": job.obey_robots,
        "DOWNLOAD_DELAY": job.delay_s,
        "DOWNLOAD_DELAY_JITTER": 0,  # the configured delay exactly
        "CONCURRENT_REQUESTS": max(16, job.concurrency_per_host),
        "CONCURRENT_REQUESTS_PER_DOMAIN": job.concurrency_per_host,
        "AUTOTHROTTLE_ENABLED": job.autothrottle,
        "AUTOTHROTTLE_START_DELAY": job.delay_s,
        "AUTOTHROTTLE_MAX_DELAY": max(10.0, job.delay_s * 10),
        "AUTOTHROTTLE_TARGET_CONCURRENCY": float(job.concurrency_per_host),
        "DOWNLOAD_TIMEOUT": job.timeout_s,
        "DNS_TIMEOUT": job.timeout_s,
        "REDIRECT_ENABLED": True,
        "REDIRECT_MAX_TIMES": job.max_redirects,
        "METAREFRESH_ENABLED": False,
        "RETRY_ENABLED": job.retries > 0,
        "RETRY_TIMES": job.retries,
        "DOWNLOAD_MAXSIZE": job.max_body_bytes,
        "DOWNLOAD_WARNSIZE": 0,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "DEPTH_LIMIT": 0,  # depth is FrontierGuard's business (max_depth)
        "SCHEDULER_MEMORY_QUEUE": "scrapy.squeues.FifoMemoryQueue",  # breadth-first within a depth
        "SCHEDULER_DISK_QUEUE": "scrapy.squeues.PickleFifoDiskQueue",
        "DOWNLOADER_MIDDLEWARES": {f"{__name__}.FrontierGuard": 40,
                                   "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware": None,
                                   f"{__name__}.RobotsTxt": 100},
        "LOG_LEVEL": "WARNING",  # the progress bar and the session summary say what INFO would
        "LOGSTATS_INTERVAL": 30.0,
    }


def main(argv: list[str]) -> int:
    global _STATE
    job = CrawlJob.read(argv[0])
    _STATE = CrawlState(job)
    _STATE.load()
    if len(_STATE.fetched) >= job.max_pages or not _STATE.frontier:
        n = len(list(_STATE.state_dir.glob("session-*.json")))
        (_STATE.state_dir / f"session-{n:05d}.json").write_text(json.dumps(
            {"pages_written": 0, "pages_total": len(_STATE.fetched), "skipped": {}, "close_reason": "nothing_to_do",
             "generation": job.generation}))
        return 0
    settings = settings_for(job)
    process = CrawlerProcess(settings)
    process.crawl(PageSpider, state=_STATE, max_in_flight=settings["CONCURRENT_REQUESTS"])
    process.start()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
