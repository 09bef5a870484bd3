"""The crawler against a local site built here, and warcio reading what it wrote.

The site (127.0.0.1, random port) has linked pages, a robots.txt disallowing /private/, a
redirect, a redirect loop, a slow page, a 50 MB page, a binary download, a branching link trap,
a relative-link trap, a calendar trap and a link to a second (off-host) server. Both servers
record every request they receive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator

from llmpipe.data import crawl
from llmpipe.data.crawl import CrawlJob, TrapGuard, host_allowed, normalize_url, run_crawl

HUGE_BYTES = 50 * 1024 * 1024


def _page(title: str, links: list[str]) -> bytes:
    body = "".join(f'<p><a href="{href}">link {i}</a></p>' for i, href in enumerate(links))
    return (f"<html><head><title>{title}</title></head><body><h1>{title}</h1>"
            f"<p>Some text about {title}.</p>{body}</body></html>").encode()


class Site:
    """A ThreadingHTTPServer on 127.0.0.1 that logs each request path."""

    def __init__(self, routes, page_delay_s: float = 0.0):
        self.requests: list[str] = []
        self.huge_sent = 0
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with site.lock:
                    site.requests.append(self.path)
                if page_delay_s and self.path != "/robots.txt":
                    time.sleep(page_delay_s)
                try:
                    routes(site, self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_port}/"
        self.netloc = f"127.0.0.1:{self.server.server_port}"

    def counts(self) -> Counter:
        with self.lock:
            return Counter(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _send(handler, body: bytes, status: int = 200, content_type: str = "text/html; charset=utf-8", headers=()):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in headers:
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def _redirect(handler, location: str):
    handler.send_response(302)
    handler.send_header("Location", location)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


# The real (allowed, fetchable) pages and their depth from "/".
REAL_PAGES = {"/": 0, "/a.html": 1, "/b.html": 1, "/c.html": 1, "/d.html": 2, "/e.html": 2, "/f.html": 2,
              "/g.html": 2, "/h.html": 3, "/rel/": 1, "/rel/more/": 2, "/rel/more/more/": 3}


def make_routes(offsite_base: str):
    pages = {
        "/": ["/a.html", "/b.html", "/c.html", "/a.html#top", "/./b.html", "/private/secret.html", "/loop-1",
              "/slow.html", "/huge.html", "/download", "/file.bin", "/trap/", "/calendar?day=0", "/rel/",
              offsite_base + "offsite.html", "mailto:someone@example.com"],
        "/a.html": ["/d.html", "/e.html", "/", "/b.html"],
        "/b.html": ["/f.html", "/private/other.html", "/A.html#x"],
        "/c.html": ["/redirect-to-g"],
        "/d.html": ["/h.html", "/a.html"],
        "/e.html": [], "/f.html": [], "/g.html": ["/"], "/h.html": ["/"],
        "/private/secret.html": [], "/private/other.html": [],
    }

    def routes(site: Site, h: BaseHTTPRequestHandler):
        path = h.path
        if path == "/robots.txt":
            return _send(h, b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
        if path in pages:
            return _send(h, _page(path, pages[path]))
        if path == "/redirect-to-g":
            return _redirect(h, "/g.html")
        if path == "/loop-1":
            return _redirect(h, "/loop-2")
        if path == "/loop-2":
            return _redirect(h, "/loop-1")
        if path == "/slow.html":  # longer than the crawl's 2 s timeout
            time.sleep(6)
            return _send(h, _page("slow", []))
        if path == "/huge.html":  # no Content-Length: the client must cut it off while streaming
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.end_headers()
            chunk = b"<p>" + b"x" * 65530 + b"</p>"
            while site.huge_sent < HUGE_BYTES:
                h.wfile.write(chunk)
                site.huge_sent += len(chunk)
            return
        if path in ("/download", "/file.bin"):
            return _send(h, os.urandom(1 << 20), content_type="application/octet-stream")
        if path.startswith("/trap/"):  # every page links to three new, deeper pages
            return _send(h, _page(path, [f"{path}{i}/" for i in range(3)]))
        if path.startswith("/calendar?day="):
            day = int(path.rsplit("=", 1)[1])
            return _send(h, _page(path, [f"/calendar?day={day + 1}"]))
        if path.startswith("/rel/"):  # a relative link resolved against itself: /rel/more/more/more/...
            return _send(h, _page(path, ["more/"]))
        return _send(h, b"not found", status=404, content_type="text/plain")

    return routes


@pytest.fixture
def sites():
    offsite = Site(lambda site, h: _send(h, _page("offsite", [])))
    site = Site(make_routes(offsite.base))
    yield site, offsite
    site.close()
    offsite.close()


def _job(site: Site, tmp: Path, **overrides) -> CrawlJob:
    settings = dict(seeds=[site.base], allowed_hosts=[site.netloc], warc_dir=str(tmp / "warc"),
                    state_dir=str(tmp / ".state"), max_pages=60, max_depth=4, concurrency_per_host=4,
                    timeout_s=2.0, retries=0, max_body_bytes=1 << 20, max_query_variants=2,
                    user_agent="llmpipe-test")
    settings.update(overrides)
    return CrawlJob(**settings)


def _warc_urls(warc_dir: Path) -> list[str]:
    """Target URIs of the response records, read back with warcio."""
    urls = []
    for path in sorted(Path(warc_dir).glob("*.warc.gz")):
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type == "response":
                    assert record.http_headers.get_statuscode() == "200"
                    assert record.content_stream().read().startswith(b"<html>")
                    urls.append(record.rec_headers.get_header("WARC-Target-URI"))
    return urls


def _paths(urls, site: Site) -> list[str]:
    return [u[len(site.base) - 1:] for u in urls]


# --- unit tests --------------------------------------------------------------------------------


def test_normalize_url_spells_each_page_once():
    assert normalize_url("HTTP://Example.COM:80/a/./b/../c.html#frag") == "http://example.com/a/c.html"
    assert normalize_url("https://example.com") == "https://example.com/"
    assert normalize_url("http://example.com:8080/x?b=2&a=1") == "http://example.com:8080/x?a=1&b=2"
    assert normalize_url("http://127.0.0.1:9/a.html#top") == normalize_url("http://127.0.0.1:9/./a.html")


def test_host_allowed_and_trap_guard():
    assert host_allowed("http://127.0.0.1:8000/x", ["127.0.0.1:8000"])
    assert not host_allowed("http://127.0.0.1:8001/x", ["127.0.0.1:8000"])
    assert host_allowed("https://docs.example.com/x", ["example.com"])
    assert not host_allowed("https://example.com.evil.org/", ["example.com"])
    assert not host_allowed("mailto:a@example.com", ["example.com"])
    guard = TrapGuard(max_url_length=60, max_path_segments=4, max_segment_repeats=2, max_query_variants=2)
    assert guard.check("http://h/a/b/a/b/") is None
    assert guard.check("http://h/a/b/a/b/a/") == "trap_path_depth"
    assert guard.check("http://h/x/x/x/") == "trap_repeated_segment"
    assert guard.check("http://h/" + "y" * 80) == "trap_url_length"
    assert [guard.check(f"http://h/cal?d={i}") for i in range(3)] == [None, None, "trap_query_variants"]


# --- the crawl ---------------------------------------------------------------------------------


def test_crawl_local_site(sites, tmp_path):
    site, offsite = sites
    job = _job(site, tmp_path, max_pages=30)
    t0 = time.monotonic()
    summary = run_crawl(job, timeout_s=120)
    assert time.monotonic() - t0 < 60

    paths = _paths(_warc_urls(tmp_path / "warc"), site)
    assert len(paths) == len(set(paths)), "a URL is in the WARC twice"
    assert len(paths) <= job.max_pages == 30  # the budget holds ...
    assert set(REAL_PAGES) <= set(paths)  # ... and the trap did not starve the real pages
    assert summary["pages_written"] == len(paths)

    requested = site.counts()
    for path in REAL_PAGES:  # every allowed page fetched exactly once
        assert requested[path] == 1, (path, requested[path])
    assert requested["/robots.txt"] == 1
    assert all(n == 1 for n in requested.values()), requested  # nothing fetched twice at all
    assert not any(p.startswith("/private/") for p in requested)  # robots.txt obeyed
    assert offsite.counts() == Counter()  # nothing off-host
    assert "/file.bin" not in requested  # binary by extension: never requested
    assert "/download" not in paths  # binary by content type: headers only, not stored
    assert "/slow.html" not in paths and "/huge.html" not in paths
    assert site.huge_sent < HUGE_BYTES // 2  # the 50 MB page was cut off, not downloaded
    assert "/loop-1" not in paths and "/loop-2" not in paths
    # trap guards: the repeated segment, the calendar's query variants
    assert "/rel/more/more/more/" not in requested
    assert sum(p.startswith("/calendar") for p in paths) <= 2
    assert max(REAL_PAGES.get(p, 0) for p in paths) <= job.max_depth

    skipped = summary["skipped"]
    assert skipped["robots"] == 2 and skipped["offsite"] == 1
    assert skipped["not_html"] == 2  # /download, and the text/plain 404 of /A.html
    assert skipped["too_large"] == 1 and skipped["timeout"] == 1
    assert skipped["trap_repeated_segment"] >= 1 and skipped["trap_query_variants"] == 1
    assert skipped["redirect_loop"] == 1

    # the redirect target is stored under its own URL, with where it came from
    pages = {p.url: p for p in crawl.iter_warc_pages(tmp_path / "warc")}
    g = pages[site.base + "g.html"]
    assert g.depth == 2 and g.redirected_from == (site.base + "redirect-to-g",)


def test_crawl_budget_stops_at_max_pages(sites, tmp_path):
    site, _ = sites
    summary = run_crawl(_job(site, tmp_path, max_pages=5), timeout_s=60)
    paths = _paths(_warc_urls(tmp_path / "warc"), site)
    assert len(paths) == 5 == summary["pages_written"]
    assert paths[0] == "/"
    # a second run with the same job has nothing left to do and fetches nothing
    before = sum(site.counts().values())
    assert run_crawl(_job(site, tmp_path, max_pages=5), timeout_s=60)["pages_written"] == 0
    assert sum(site.counts().values()) == before


def test_two_crawls_of_a_static_site_under_a_page_budget_keep_the_same_pages(tmp_path):
    """Pages answer after random delays (other ones in each crawl), some fail: the budget still
    fills with the same pages, the first that succeed in (depth, URL) order."""
    import random

    jitter = random.Random(0)
    pages = {"/": [f"/p{i:02d}.html" for i in range(40)]}
    pages.update({f"/p{i:02d}.html": [f"/q{i:02d}-{j}.html" for j in range(3)] for i in range(40)})

    def routes(site, h):
        time.sleep(jitter.uniform(0, 0.08))
        if h.path in pages and h.path not in ("/p03.html", "/p07.html"):  # two links are broken
            return _send(h, _page(h.path, pages[h.path]))
        return _send(h, b"gone", status=404, content_type="text/plain")

    kept = []
    for attempt in range(3):
        site = Site(routes)
        try:
            run_crawl(_job(site, tmp_path / str(attempt), max_pages=15, concurrency_per_host=8), timeout_s=60)
            kept.append(sorted(_paths(_warc_urls(tmp_path / str(attempt) / "warc"), site)))
        finally:
            site.close()
    assert kept[0] == ["/", *[f"/p{i:02d}.html" for i in range(16) if i not in (3, 7)]]
    assert kept[1] == kept[0] and kept[2] == kept[0]


def test_every_request_of_a_first_burst_waits_for_robots_txt(sites, tmp_path):
    """Scrapy 2.19 let the third request that waited for a host's robots.txt through unchecked."""
    site, _ = sites
    seeds = [site.base + p for p in ("", "a.html", "b.html", "private/secret.html", "private/other.html")]
    summary = run_crawl(_job(site, tmp_path, seeds=seeds, max_depth=0), timeout_s=60)
    assert not any(path.startswith("/private/") for path in site.counts())
    assert summary["skipped"]["robots"] == 2


def _wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_crawl_resumes_to_the_same_pages(tmp_path, sig):
    offsite = Site(lambda site, h: _send(h, _page("offsite", [])))
    slow_site = Site(make_routes(offsite.base), page_delay_s=0.1)
    try:
        full = _job(slow_site, tmp_path / "full", max_pages=500, max_depth=3, concurrency_per_host=2)
        run_crawl(full, timeout_s=120)
        expected = set(_paths(_warc_urls(tmp_path / "full" / "warc"), slow_site))
        assert set(REAL_PAGES) <= expected

        job = _job(slow_site, tmp_path / "killed", max_pages=500, max_depth=3, concurrency_per_host=2)
        Path(job.state_dir).mkdir(parents=True)
        start = sum(slow_site.counts().values())
        proc = subprocess.Popen(crawl.crawler_command(job.write()), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert _wait_for(lambda: sum(slow_site.counts().values()) - start >= 12, 60)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        for part in crawl.warc_parts(tmp_path / "killed" / "warc"):
            crawl.repair_warc(part)  # SIGKILL may leave half a record; the resumed crawl does this too
        partial = _paths(_warc_urls(tmp_path / "killed" / "warc"), slow_site)
        assert 0 < len(partial) < len(expected)  # killed half-way

        run_crawl(job, timeout_s=120)
        urls = _paths(_warc_urls(tmp_path / "killed" / "warc"), slow_site)
        assert len(urls) == len(set(urls)), "a URL is in the WARC twice"
        assert set(urls) == expected
        assert len(list((tmp_path / "killed" / "warc").glob("part-*.warc.gz"))) == 2
    finally:
        slow_site.close()
        offsite.close()


def test_truncated_warc_is_repaired(sites, tmp_path):
    site, _ = sites
    run_crawl(_job(site, tmp_path, max_pages=6), timeout_s=60)
    part = tmp_path / "warc" / "part-00000.warc.gz"
    data = part.read_bytes()
    part.write_bytes(data[:-200])  # a kill in the middle of the last record
    assert crawl.repair_warc(part) > 0
    assert len(_warc_urls(tmp_path / "warc")) in (5, 6)
    # the resumed crawl fills the gap without duplicates
    run_crawl(_job(site, tmp_path, max_pages=6), timeout_s=60)
    urls = _warc_urls(tmp_path / "warc")
    assert len(urls) == len(set(urls)) == 6


def test_a_crawl_that_keeps_no_page_fails_and_says_why(sites, tmp_path):
    """Seeds that all fail (a plain-text 404, a page robots.txt disallows): the stage stops with the
    reasons, and no manifest."""
    from llmpipe import stages
    from llmpipe.config import validate
    from llmpipe.errors import UserError
    from llmpipe.paths import RunDir

    site, _ = sites
    config = validate({"run": {"name": "t", "run_dir": str(tmp_path / "run")},
                       "crawl": {"seeds": [site.base + "missing.html", site.base + "private/secret.html"],
                                 "retries": 0, "timeout_s": 2.0}})
    with pytest.raises(UserError) as err:
        stages.execute("crawl", config)
    assert str(err.value) == (
        f"the crawl kept no page from {site.base}missing.html, {site.base}private/secret.html (skipped, by reason: "
        f"not_html 1, robots 1); check crawl.seeds and crawl.allowed_hosts ({site.netloc})")
    assert not RunDir(tmp_path / "run").manifest("crawl").exists()


# --- other sources -----------------------------------------------------------------------------


def test_warc_inputs_are_copied(sites, tmp_path):
    site, _ = sites
    run_crawl(_job(site, tmp_path / "src", max_pages=4), timeout_s=60)
    source = tmp_path / "src" / "warc" / "part-00000.warc.gz"
    counts = crawl.ingest_warc_inputs([str(source), f"file://{source}"], tmp_path / "out")
    assert counts["warc_files"] == 2
    copies = sorted((tmp_path / "out" / "warc").glob("*.warc.gz"))
    assert len(copies) == 2 and all(len(_warc_urls(c.parent)) == 8 for c in copies[:1])


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port`, from the kernel's table (/proc/net/tcp)."""
    import socket
    import struct

    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return addresses


def test_pydoc_server_serves_and_stops():
    from llmpipe.data.pydoc_server import exclusion_patterns, pydoc_server

    with pydoc_server() as base:
        assert base.startswith("http://127.0.0.1:")
        html = urllib.request.urlopen(base, timeout=20).read().decode()
        assert "Index of Modules" in html or "Python" in html
        port = int(base.rstrip("/").rsplit(":", 1)[1])
        assert _listening_addresses(port) == {"127.0.0.1"}  # loopback only, as every server llmpipe starts
    with pytest.raises(OSError):
        urllib.request.urlopen(base, timeout=2)
    import re
    patterns = [re.compile(p) for p in exclusion_patterns(["test", "idlelib"])]
    assert any(p.search(f"http://127.0.0.1:{port}/test.support.html") for p in patterns)
    assert not any(p.search(f"http://127.0.0.1:{port}/textwrap.html") for p in patterns)
