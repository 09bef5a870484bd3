"""What a scheduled run costs when the web changed little: a full run, an unchanged one, one with 10% of the pages changed.

    python benchmarks/refresh.py [--pages 60] [--changed 0.1] [--steps 20]

A local site (127.0.0.1, ETag and Last-Modified, `304` to a matching `If-None-Match`) of `--pages`
pages of English prose (sentences of the standard library's docstrings); the flow with
`crawl.refresh: always` up to pretraining (a small model, `--steps` steps, then `refresh_steps`
more). Run 1 crawls and trains; run 2 finds the site unchanged; run 3 finds `--changed` of the
pages rewritten. Prints each run's wall time and which stages ran.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pydoc
import random
import re
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from local_server import serve  # noqa: E402

os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def sentences() -> list[str]:
    """English sentences from the docstrings of a few standard-library modules."""
    text = " ".join(pydoc.getdoc(getattr(module, name)) for module in map(__import__, ["json", "shutil", "textwrap",
                    "argparse", "pathlib", "csv", "heapq", "statistics"]) for name in dir(module) if not name.startswith("_"))
    found = {s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 40 < len(s) < 300 and s[0].isupper()}
    return sorted(found)


def page(rng: random.Random, pool: list[str], title: str, links: list[str]) -> bytes:
    paragraphs = "".join(f"<p>{' '.join(rng.sample(pool, 5))}</p>" for _ in range(4))
    nav = "".join(f'<a href="{link}">{link}</a> ' for link in links)
    return f"<html><head><title>{title}</title></head><body><article><h1>{title}</h1>{paragraphs}</article>{nav}</body></html>".encode()


def site(pages: dict[str, bytes]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = pages.get(self.path, b"User-agent: *\n" if self.path == "/robots.txt" else None)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.end_headers()
            self.wfile.write(body)

    return serve(Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--changed", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from flows.pipeline import pipeline

    rng, pool = random.Random(0), sentences()
    paths = [f"/page{i}.html" for i in range(args.pages)]
    pages = {path: page(rng, pool, f"Page {i}", [paths[(i + k) % len(paths)] for k in (1, 2, 3)])
             for i, path in enumerate(paths)}
    pages["/"] = "".join(f'<a href="{p}">{p}</a> ' for p in paths).encode()
    server = site(pages)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "refresh.yaml"
        config.write_text(yaml.safe_dump({
            "run": {"name": "refresh-bench", "seed": 0},
            "crawl": {"seeds": [f"http://127.0.0.1:{server.server_port}/"], "max_pages": args.pages + 1,
                      "max_depth": 2, "refresh": "always", "retries": 0},
            "prepare": {"tasks": 2, "workers": 2},
            "tokenizer": {"vocab_size": 1024},
            "shard": {"seq_len": 128, "tokens_per_shard": 1 << 14, "val_fraction": 0.1},
            "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256, "vocab_size": 1024, "seq_len": 128},
            "pretrain": {"max_steps": args.steps, "batch_tokens": 8 * 128, "micro_batch_size": 8, "eval_every": 0,
                         "checkpoint_every": 0, "log_every": 10, "warmup_steps": 2, "refresh_steps": args.steps // 2},
        }))
        rows = []
        for name in ("full", "unchanged", f"{args.changed:.0%} changed"):
            if "changed" in name and name != "unchanged":
                for path in rng.sample(paths, max(1, round(args.changed * len(paths)))):
                    pages[path] = page(rng, pool, path, [])
            t0 = time.perf_counter()
            stages = pipeline(config_path=str(config), run_dir=str(Path(tmp) / "runs" / "bench"), until="pretrain")["stages"]
            rows.append((name, time.perf_counter() - t0, " ".join(s for s, how in stages.items() if how == "ran"),
                         " ".join(s for s, how in stages.items() if how == "cached")))
    server.shutdown()
    print(f"\n{'run':<12} {'wall s':>7}  {'ran':<40} cached")
    for name, seconds, ran, cached in rows:
        print(f"{name:<12} {seconds:7.1f}  {ran:<40} {cached}")


if __name__ == "__main__":
    main()
