"""Same inputs, same bytes: a run repeated in another directory writes identical files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_prepare import _site_pages, write_warc

from llmpipe import config as configlib
from llmpipe import io, stages

pytestmark = pytest.mark.slow

STAGES = ("crawl", "prepare", "tokenizer", "shard", "pretrain")


def _config(tmp_path: Path, warc: Path) -> Path:
    path = tmp_path / "repro.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "repro", "seed": 3},
        "crawl": {"warc_inputs": [str(warc)]},
        "prepare": {"tasks": 2, "workers": 2},
        "tokenizer": {"vocab_size": 300},
        "shard": {"seq_len": 16, "tokens_per_shard": 1024, "val_fraction": 0.25},
        "model": {"vocab_size": 300, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 16},
        "pretrain": {"max_steps": 3, "batch_tokens": 64, "micro_batch_size": 4, "eval_every": 0, "eval_steps": 1,
                     "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1},
    }))
    return path


def _file_hashes(run_dir: Path) -> dict[str, str]:
    """Every file of the run but its logs and hidden bookkeeping (caches, locks, datatrove's state)."""
    return {str(p.relative_to(run_dir)): io.sha256_file(p) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] != "logs"
            and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)}


def test_a_run_repeated_elsewhere_writes_the_same_bytes(tmp_path):
    warc = tmp_path / "input" / "site.warc.gz"
    write_warc(warc, _site_pages())
    config_path = _config(tmp_path, warc)
    hashes = []
    for where in ("first/runs/repro", "elsewhere/deeper/repro"):  # another path, another wall clock
        config = configlib.load(config_path, run_dir=tmp_path / where)
        for name in STAGES:
            stages.execute(name, config)
        hashes.append(_file_hashes(tmp_path / where))
    first, second = hashes
    assert {f"{name}/manifest.json" for name in STAGES} | {"config.yaml", "pretrain/model.safetensors"} <= set(first)
    assert any(name.startswith("prepare/documents/") for name in first)
    assert {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)} == set()


def test_crawled_or_given_the_same_warc_makes_the_same_bytes_after_crawl(tmp_path):
    """Run A crawls a local site; run B is given A's WARC by `crawl.warc_inputs`: from prepare on,
    every output file is the same, so every cache key after crawl is too."""
    from test_crawl import Site, _send

    pages = {f"/{url.rsplit('/', 1)[-1]}": body for url, body in _site_pages()}
    index = "".join(f'<a href="{path}">{path}</a> ' for path in pages).encode()

    def routes(site, handler):
        if handler.path == "/":
            return _send(handler, b"<html><body>" + index + b"</body></html>")
        if handler.path in pages:
            return _send(handler, pages[handler.path])
        return _send(handler, b"not found", status=404, content_type="text/plain")

    site = Site(routes)
    try:
        crawled = _config(tmp_path, tmp_path / "unused.warc.gz")
        tree = yaml.safe_load(crawled.read_text())
        tree["crawl"] = {"seeds": [site.base], "max_pages": 50, "retries": 0, "timeout_s": 5.0}
        crawled.write_text(yaml.safe_dump(tree))
        run_a = configlib.load(crawled, run_dir=tmp_path / "a" / "repro")
        stages.execute("crawl", run_a)
    finally:
        site.close()
    warcs = sorted((tmp_path / "a" / "repro" / "crawl" / "warc").glob("*.warc.gz"))
    assert len(warcs) == 1, warcs
    (tmp_path / "b").mkdir()
    given = _config(tmp_path / "b", warcs[0])
    run_b = configlib.load(given, run_dir=tmp_path / "b" / "repro")
    stages.execute("crawl", run_b)
    hashes = []
    for config in (run_a, run_b):
        for name in ("prepare", "tokenizer", "shard"):
            stages.execute(name, config)
        hashes.append({k: v for k, v in _file_hashes(config.run_dir).items() if not k.startswith("crawl/")})
    first, second = hashes
    assert any(name.startswith("prepare/documents/") for name in first) and "shard/manifest.json" in first
    different = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    assert different == {"config.yaml"}  # seeds in one, warc_inputs in the other
    for name in ("tokenizer", "shard"):
        assert stages.cache_key(stages.get_stage(name), run_a) == stages.cache_key(stages.get_stage(name), run_b)
