"""Throughput of the web-data stages on this machine.

    python benchmarks/data_throughput.py [--site-pages 1000] [--pydoc-pages 300] [--workers 1,2]

Prints pages/s for crawling (a synthetic local site served by a threaded http.server, and the
local pydoc server), then docs/s and MB/s for extraction (and for extraction of pages seen before,
which a refresh takes from the extraction cache), filtering and each MinHash stage, run by
datatrove's LocalPipelineExecutor with 1 and 2 workers on the pydoc crawl (real HTML).
Extraction MB/s counts HTML bytes in; the other stages count text bytes in.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from local_server import serve  # noqa: E402

from llmpipe.config import CrawlSection  # noqa: E402
from llmpipe.data import filters as F  # noqa: E402
from llmpipe.data.crawl import CrawlJob, _crawl_pydoc, run_crawl, warc_summary  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more up out who them some "
         "river library bread bird season village market winter summer mountain forest valley story morning").split()


ROWS: list[tuple] = []  # (stage, workers, items, unit, seconds, items/s, MB/s)
NOTES: list[str] = []


def synthetic_site(pages: int, seed: int = 0) -> ThreadingHTTPServer:
    """`pages` HTML pages of ~8 KB of words, each linking to 10 others; served on 127.0.0.1."""
    rng = random.Random(seed)
    bodies = {}
    for i in range(pages):
        paragraphs = "".join("<p>" + " ".join(rng.choice(WORDS) for _ in range(120)).capitalize() + ".</p>"
                             for _ in range(10))
        links = "".join(f'<a href="/p{rng.randrange(pages)}.html">next</a> ' for _ in range(10))
        bodies[f"/p{i}.html"] = f"<html><body><h1>Page {i}</h1>{paragraphs}{links}</body></html>".encode()
    bodies["/"] = ("<html><body>" + "".join(f'<a href="/p{i}.html">p</a>' for i in range(0, pages, 10))
                   + "</body></html>").encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # headers and body in separate sends would stall 40 ms (delayed ACK)
        wbufsize = 1 << 16

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = bodies.get(self.path)
            if self.path == "/robots.txt" or body is None:
                body, status = b"", 404
            else:
                status = 200
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return serve(Handler)


def bench_crawl_site(pages: int, work: Path) -> None:
    server = synthetic_site(pages)
    base = f"http://127.0.0.1:{server.server_port}/"
    try:
        for concurrency in (1, 8):
            out = work / f"site-c{concurrency}"
            job = CrawlJob(seeds=[base], allowed_hosts=[f"127.0.0.1:{server.server_port}"], warc_dir=str(out / "warc"),
                           state_dir=str(out / ".state"), max_pages=pages, max_depth=10,
                           concurrency_per_host=concurrency, autothrottle=False)
            t0 = time.perf_counter()
            summary = run_crawl(job)
            wall = time.perf_counter() - t0
            inside = summary.get("elapsed_s") or wall
            ROWS.append((f"crawl synthetic site (concurrency {concurrency})", "-", summary["pages_written"], "pages",
                         inside, summary["pages_written"] / inside, None))
    finally:
        server.shutdown()


def bench_crawl_pydoc(pages: int, work: Path) -> Path:
    cfg = CrawlSection(max_pages=pages, max_depth=3, timeout_s=20.0, max_query_variants=200)
    out = work / "pydoc"
    t0 = time.perf_counter()
    summary, _ = _crawl_pydoc(cfg, out / "warc", out / ".state")
    wall = time.perf_counter() - t0
    info = warc_summary(out / "warc")
    ROWS.append(("crawl pydoc server (concurrency 4)", "-", summary["pages_written"], "pages", summary["elapsed_s"],
                 summary["pages_written"] / summary["elapsed_s"], info["html_bytes"] / 1e6 / summary["elapsed_s"]))
    del wall  # includes starting pydoc and the crawler process
    return out / "warc"


def _text_mb(folder: Path) -> tuple[int, float]:
    docs, size = 0, 0
    for path in folder.glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            for line in f:
                docs += 1
                size += len(json.loads(line)["text"].encode())
    return docs, size / 1e6


def bench_prepare(warc_dir: Path, workers: int, work: Path) -> None:
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from llmpipe.data.extract import CachedTrafilatura, ExtractionCache
    from llmpipe.data.prepare import RecordShardedWarcReader, Runner

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    from llmpipe.config import load

    cfg = load(tiny).prepare.model_copy(update={"tasks": 2, "workers": workers})
    runner = Runner(cfg, work / "logs")
    data = work / "data"
    html_mb = warc_summary(warc_dir)["html_bytes"] / 1e6
    mh = MinhashConfig(hash_config=HashConfig(precision=64))

    def line(stage: str, docs: int, mb: float, seconds: float) -> None:
        ROWS.append((stage, workers, docs, "docs", seconds, docs / seconds, mb / seconds))

    cache = ExtractionCache(work / "extractions.sqlite")
    for job, output in (("extract", "extracted"), ("extract_seen", "extracted_again")):  # the second: a refresh's
        runner.run(job, [RecordShardedWarcReader(str(warc_dir), glob_pattern="*.warc*"),
                         CachedTrafilatura(cache.path, data / f"{job}_new", favour_precision=True,
                                           timeout=cfg.extract_timeout_s, deduplicate=False),
                         JsonlWriter(str(data / output), output_filename="${rank}.jsonl.gz")], 2)
        cache.merge(data / f"{job}_new")
    docs_in = int(F.step_counts(next(s for s in F.read_stats(work / "logs" / "extract")
                                     if s.name.endswith(CachedTrafilatura.name)))["in"])
    line("extract", docs_in, html_mb, runner.seconds["extract"])
    line("extract, HTML seen before (cache)", docs_in, html_mb, runner.seconds["extract_seen"])

    docs, mb = _text_mb(data / "extracted")
    runner.run("filters", [JsonlReader(str(data / "extracted")), *[s for _, s in F.build_filters(cfg)],
                           JsonlWriter(str(data / "filtered"), output_filename="${rank}.jsonl.gz")], 2)
    line("filters", docs, mb, runner.seconds["filters"])

    docs, mb = _text_mb(data / "filtered")
    runner.run("minhash_signature", [JsonlReader(str(data / "filtered")),
                                     MinhashDedupSignature(str(data / "sigs"), config=mh)], 2)
    line("minhash signature", docs, mb, runner.seconds["minhash_signature"])
    runner.run("minhash_buckets", [MinhashDedupBuckets(str(data / "sigs"), str(data / "buckets"), config=mh)],
               mh.num_buckets)
    line("minhash buckets", docs, mb, runner.seconds["minhash_buckets"])
    runner.run("minhash_cluster", [MinhashDedupCluster(str(data / "buckets"), str(data / "remove"), config=mh)], 1)
    line("minhash cluster", docs, mb, runner.seconds["minhash_cluster"])
    runner.run("minhash_filter", [JsonlReader(str(data / "filtered")), MinhashDedupFilter(str(data / "remove")),
                                  JsonlWriter(str(data / "deduped"), output_filename="${rank}.jsonl.gz")], 2)
    line("minhash filter", docs, mb, runner.seconds["minhash_filter"])
    kept, kept_mb = _text_mb(data / "deduped")
    NOTES.append(f"workers={workers}: {kept} documents, {kept_mb:.2f} MB of text left after dedup")


def print_table() -> None:
    print(f"\n{'stage':<40} {'workers':>7} {'items':>7} {'seconds':>8} {'items/s':>9} {'MB/s':>7}")
    for stage, workers, n, unit, seconds, rate, mb_s in ROWS:
        mb = f"{mb_s:7.2f}" if mb_s is not None else f"{'':>7}"
        print(f"{stage:<40} {workers!s:>7} {n:>7} {seconds:8.2f} {rate:>9.1f} {mb}  ({unit})")
    for note in NOTES:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-pages", type=int, default=1000, help="pages of the synthetic site")
    parser.add_argument("--pydoc-pages", type=int, default=300, help="pages crawled from the pydoc server")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts for the prepare stages")
    args = parser.parse_args()
    import logging

    from datatrove.utils.logging import logger

    logger.remove()  # datatrove's per-rank progress logs would bury the figures
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-") as tmp:
        work = Path(tmp)
        bench_crawl_site(args.site_pages, work)
        warc_dir = bench_crawl_pydoc(args.pydoc_pages, work)
        for workers in (int(w) for w in args.workers.split(",")):
            bench_prepare(warc_dir, workers, work / f"prepare-w{workers}")
    print_table()


if __name__ == "__main__":
    main()
