"""Scheduled runs that see new data: `crawl.refresh: always` recrawls a local site that answers
conditional requests (ETag, Last-Modified), with the real Prefect flow up to the shards.

Unchanged, the recrawl stores no payload again (revisit records) and every later stage stays cached;
after one page changed, one went away and two new ones copy old ones (exactly, nearly), exactly the
changed page's document differs, the removed page is gone, both copies are dropped by dedup, only the
pages prepare had not seen are extracted and the tokenizer is kept."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from email.utils import formatdate
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_crawl import Site, _send
from test_post_training import POST_MODEL
from test_prepare import _site_pages
from tokenizers import Tokenizer
from warcio.archiveiterator import ArchiveIterator

from llmpipe.data.crawl import warc_parts
from llmpipe.data.shards import load_split
from llmpipe.eval.intrinsic import heldout_metrics, token_byte_lengths
from llmpipe.model.release import load_release
from llmpipe.paths import RunDir
from llmpipe.tracking import EXPERIMENT, tracking_uri

pytestmark = pytest.mark.slow


class VersionedSite:
    """Pages that can change between crawls; each served with an ETag and a Last-Modified of its version."""

    def __init__(self, pages: dict[str, bytes]):
        self.pages = dict(pages)
        self.versions = {path: 1 for path in pages}
        self.statuses: list[tuple[str, int]] = []
        self.site = Site(self._route)
        self.base = self.site.base

    def index(self) -> bytes:
        return b"<html><body>" + "".join(f'<a href="{p}">{p}</a> ' for p in sorted(self.pages)).encode() + b"</body></html>"

    def change(self, path: str, body: bytes) -> None:
        self.pages[path] = body
        self.versions[path] = self.versions.get(path, 0) + 1

    def _route(self, site, handler):
        if handler.path == "/robots.txt":
            return _send(handler, b"User-agent: *\n", content_type="text/plain")
        body = self.index() if handler.path == "/" else self.pages.get(handler.path)
        if body is None:
            self.statuses.append((handler.path, 404))
            return _send(handler, b"not found", status=404, content_type="text/plain")
        etag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
        modified = formatdate(1_700_000_000 + 86_400 * self.versions.get(handler.path, 1), usegmt=True)
        if handler.headers.get("If-None-Match") == etag:
            self.statuses.append((handler.path, 304))
            handler.send_response(304)
            handler.send_header("ETag", etag)
            handler.end_headers()
            return None
        self.statuses.append((handler.path, 200))
        return _send(handler, body, headers=[("ETag", etag), ("Last-Modified", modified)])

    def close(self) -> None:
        self.site.close()


NEWS = (b"<p>A note about the weather this week: the coast was cold and wet, the harbour closed on Tuesday, "
        b"and the ferry to the islands ran again on Friday morning once the wind had dropped.</p>")


def _config(tmp_path: Path, seed: str) -> Path:
    path = tmp_path / "refresh.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "refresh", "seed": 3},
        "crawl": {"seeds": [seed], "max_pages": 50, "retries": 0, "timeout_s": 5.0, "refresh": "always"},
        "prepare": {"tasks": 2, "workers": 2},
        "tokenizer": {"vocab_size": 300},
        "shard": {"seq_len": 96, "tokens_per_shard": 1024, "val_fraction": 0.25},
        "model": POST_MODEL,
        "pretrain": {"max_steps": 4, "batch_tokens": 2 * 96, "micro_batch_size": 2, "eval_every": 0, "eval_steps": 1,
                     "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "peak_flops": 1e11, "refresh_steps": 3},
    }))
    return path


def _documents(run_dir: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted((run_dir / "prepare" / "documents").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            for line in f:
                doc = json.loads(line)
                docs[doc["metadata"]["url"]] = doc
    return docs


def _record_types(part: Path) -> set[str]:
    with open(part, "rb") as f:
        return {record.rec_type for record in ArchiveIterator(f)}


def test_a_refresh_stores_only_what_changed_and_reruns_only_the_stages_it_changed(tmp_path):
    from flows.pipeline import pipeline

    pages = {f"/{url.rsplit('/', 1)[-1]}": body for url, body in _site_pages()
             if "copy" not in url and "near" not in url}  # no duplicates to begin with
    site = VersionedSite(pages)
    config, run_dir = _config(tmp_path, site.base), tmp_path / "runs" / "refresh"
    run = lambda: pipeline(config_path=str(config), run_dir=str(run_dir), until="pretrain")  # noqa: E731
    try:
        first_run = run()
        assert set(first_run["stages"].values()) == {"ran"}
        old_val, old_model = tmp_path / "old-shards", tmp_path / "old-pretrain"
        shutil.copytree(RunDir(run_dir).shards_dir, old_val)
        shutil.copytree(RunDir(run_dir).stage("pretrain"), old_model, ignore=shutil.ignore_patterns("checkpoints"))
        first = _documents(run_dir)
        kept = sorted(u.removeprefix(site.base[:-1]) for u in first)  # the pages the filters and dedup kept
        assert "/page0.html" in kept and len(kept) >= 4
        removed, copied, nearly_copied = [path for path in kept if path != "/page0.html"][:3]
        manifest = json.loads(RunDir(run_dir).manifest("crawl").read_text())

        # the site as it was: conditional requests, 304s, no payload stored again, nothing after the crawl reruns
        site.statuses.clear()
        assert run()["stages"] == {"crawl": "ran", "prepare": "cached", "tokenizer": "cached", "shard": "cached",
                                   "pretrain": "cached"}
        answered = [status for path, status in site.statuses if status != 404]  # the nav's /about is a 404
        assert set(answered) == {304} and len(answered) == manifest["counts"]["pages_fetched"]
        newest = warc_parts(RunDir(run_dir).warc_dir)[-1]
        assert _record_types(newest) == {"warcinfo", "revisit", "request"}
        refreshed = json.loads(RunDir(run_dir).manifest("crawl").read_text())
        assert refreshed["fingerprint"] == manifest["fingerprint"]
        assert refreshed["counts"]["refresh.unchanged"] == manifest["counts"]["pages_fetched"]
        assert refreshed["counts"]["refresh.payload_records"] == manifest["counts"]["refresh.payload_records"]

        # one page changed, one gone, a new one that copies an old page and one that nearly does
        site.change("/page0.html", pages["/page0.html"].replace(b"</article>", NEWS + b"</article>"))
        del site.pages[removed]
        site.change("/a-copy.html", pages[copied])
        near = pages[nearly_copied].replace(b"</p>", b" That is all.</p>", 1)
        assert near != pages[nearly_copied]
        site.change("/a-near-copy.html", near)
        # the tokenizer is kept (a new one would invalidate every model); the shards are made anew with it, and
        # pretraining goes on from where the last run ended
        last_run = run()
        assert last_run["stages"] == {"crawl": "ran", "prepare": "ran", "tokenizer": "cached", "shard": "ran",
                                      "pretrain": "ran"}
    finally:
        site.close()
    counts = json.loads(RunDir(run_dir).manifest("crawl").read_text())["counts"]
    assert (counts["refresh.new"], counts["refresh.changed"], counts["refresh.removed"]) == (2, 2, 1)  # "/" changed too
    after = _documents(run_dir)
    url = site.base[:-1]
    assert url + removed not in after and url + "/a-copy.html" not in after and url + copied in after
    assert url + "/a-near-copy.html" not in after and url + nearly_copied in after  # MinHash keeps the older page
    assert set(after) == set(first) - {url + removed}
    original = after[url + copied]  # exact dedup kept it, the earlier one, and counts its copy
    assert original["metadata"].pop("duplicate_count") == 1 and first[url + copied]["metadata"].pop("duplicate_count") == 0
    assert {u for u in after if after[u] != first[u]} == {url + "/page0.html"}
    assert "weather this week" in after[url + "/page0.html"]["text"]

    # continued pretraining: the step, the optimizer and the schedule go on from the last run's end, and the
    # loss on the old validation shards moves little
    pretrain = json.loads(RunDir(run_dir).manifest("pretrain").read_text())
    assert pretrain["counts"]["continued_from_step"] == 4 and pretrain["counts"]["steps"] == 4 + 3
    assert pretrain["inputs"]["continue_from"]
    client = MlflowClient(tracking_uri(run_dir.parent))

    def stage_run(stage: str, parent: str):
        return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  f"tags.`llmpipe.stage` = '{stage}' and tags.`mlflow.parentRunId` = '{parent}'")[0]

    # prepare extracted only the pages whose HTML it had not seen: the changed page, the index, the near copy
    prepared = stage_run("prepare", last_run["mlflow_run_id"]).data.metrics
    assert prepared["pages_reused"] == prepared["pages_in"] - 3
    runs = {tag: stage_run("pretrain", parent)
            for tag, parent in (("first", first_run["mlflow_run_id"]), ("last", last_run["mlflow_run_id"]))}
    lr = {tag: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/lr")] for tag, run in runs.items()}
    assert [step for step, _ in lr["first"]] == [1, 2, 3, 4] and [step for step, _ in lr["last"]] == [5, 6, 7]
    floor = 3e-3 * 0.1  # lr * min_lr_ratio: the cosine ended at max_steps, a continued run stays at its floor
    assert lr["first"][-1][1] == pytest.approx(floor) and all(v == pytest.approx(floor) for _, v in lr["last"])
    tokenizer = Tokenizer.from_file(str(RunDir(run_dir).tokenizer_dir / "tokenizer.json"))
    val, lengths = load_split(old_val, "val"), token_byte_lengths(tokenizer)
    before = heldout_metrics(load_release(old_model), val, POST_MODEL["seq_len"], lengths)["loss"]
    after = heldout_metrics(load_release(RunDir(run_dir).stage("pretrain")), val, POST_MODEL["seq_len"], lengths)["loss"]
    assert abs(after - before) < 0.25, (before, after)  # measured: see the README

    # from the record alone: `llmpipe reproduce` replays each crawl generation's WARC parts in turn, so the kept
    # tokenizer and the continued weights are rebuilt from the corpora they were made from
    from llmpipe.cli import main

    assert main(["reproduce", last_run["mlflow_run_id"], "--run-dir", str(run_dir.parent / "again"),
                 "--tracking-uri", tracking_uri(run_dir.parent)]) == 0
