"""Same inputs, same bytes, from the record alone: a run crawls a local site through the whole
graph with the real Prefect engine and MLflow store; its run directory is deleted; `llmpipe
reproduce` rebuilds it elsewhere from the MLflow record (config and WARCs) and every stage's
hashes match; `llmpipe compare` names the one config key that makes a third run differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_crawl import Site, _send
from test_post_training import POST_MODEL, SECTIONS
from test_prepare import _site_pages

from llmpipe.stages import stage_names
from llmpipe.tracking import tracking_uri

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, crawl: dict) -> Path:
    path = tmp_path / "repro.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "repro", "seed": 3},
        "crawl": crawl,
        "prepare": {"tasks": 2, "workers": 2},
        "tokenizer": {"vocab_size": 300},
        "shard": {"seq_len": 96, "tokens_per_shard": 1024, "val_fraction": 0.25},
        "model": POST_MODEL,
        "pretrain": {"max_steps": 3, "batch_tokens": 2 * 96, "micro_batch_size": 2, "eval_every": 0, "eval_steps": 1,
                     "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "peak_flops": 1e11},
        "align": {"methods": ["dpo", "ppo"]},
        **{name: {**section, **({"max_steps": 2} if "max_steps" in section else {})} for name, section in SECTIONS.items()},
    }))
    tree = yaml.safe_load(path.read_text())  # fewer examples than the post-training tests: two runs of every stage
    tree["instruct"]["task_examples"], tree["eval"]["limit"] = 40, 8
    path.write_text(yaml.safe_dump(tree))
    return path


def _site() -> Site:
    pages = {f"/{url.rsplit('/', 1)[-1]}": body for url, body in _site_pages()}
    index = "".join(f'<a href="{path}">{path}</a> ' for path in pages).encode()

    def routes(site, handler):
        if handler.path == "/":
            return _send(handler, b"<html><body>" + index + b"</body></html>")
        if handler.path in pages:
            return _send(handler, pages[handler.path])
        return _send(handler, b"not found", status=404, content_type="text/plain")

    return Site(routes)


def test_a_run_reproduced_from_its_record_alone_has_the_same_hashes_and_compare_names_the_changed_key(tmp_path, capsys):
    from flows.pipeline import pipeline
    from llmpipe.cli import main

    runs = tmp_path / "runs"
    site = _site()
    try:
        crawled = _config(tmp_path, {"seeds": [site.base], "max_pages": 50, "retries": 0, "timeout_s": 5.0})
        first = pipeline(config_path=str(crawled), run_dir=str(runs / "a"))
    finally:
        site.close()
    assert set(first["stages"]) == set(stage_names()) and set(first["stages"].values()) == {"ran"}
    report_a = json.loads((runs / "a" / "eval" / "report.json").read_text())
    shutil.rmtree(runs / "a")  # from the record alone
    uri = tracking_uri(runs)
    capsys.readouterr()

    assert main(["reproduce", first["mlflow_run_id"], "--run-dir", str(runs / "b"), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\nstage "):].splitlines()
    rows = {line.split()[0]: line for line in table[2:] if line.split() and line.split()[0] in stage_names()}
    assert set(rows) == set(stage_names()) and all(row.endswith("same") for row in rows.values()), out
    report_b = json.loads((runs / "b" / "eval" / "report.json").read_text())
    for key in ("checkpoints", "baselines", "funnel", "contamination"):  # the report's numbers, every one
        assert report_b[key] == report_a[key]
    assert report_b["funnel"]["pages_crawled"] > 5
    second = out[out.index("MLflow run:"):].split()[2]

    # a third run: B's inputs and config but for one key, up to the shard stage
    given = runs / "b" / ".inputs" / "config.yaml"
    third = pipeline(config_path=str(given), run_dir=str(runs / "c"), overrides=["shard.val_fraction=0.3"], until="shard")
    assert third["stages"] == {"crawl": "ran", "prepare": "ran", "tokenizer": "ran", "shard": "ran"}
    assert main(["compare", second, third["mlflow_run_id"], "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "config differences (1):\n  shard.val_fraction  0.25 -> 0.3\n" in out, out
    assert "first stage that differs: shard, because of its config (shard.val_fraction: 0.25 -> 0.3)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in stage_names()}
    assert lines["tokenizer"].split()[1:3] == ["same", "same"] and lines["shard"].split()[1:3] == ["differs", "differ"]
    assert lines["pretrain"].split()[1:] == ["only", "in", "A"]

    assert main(["compare", first["mlflow_run_id"], second, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out  # crawled against given: the crawl's config differs, its WARCs do not
    assert "first stage that differs: crawl, because of its config (crawl.warc_inputs: [] -> [" in out
    prepare = next(line for line in out.splitlines() if line.startswith("prepare "))
    assert prepare.split()[1:3] == ["same", "same"]
