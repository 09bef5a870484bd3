"""The stage executor: manifests, cache keys, atomic writes, resumable folders."""

from __future__ import annotations

import json
import os

import pytest

from llmpipe import config as configlib
from llmpipe import io, stages
from llmpipe.paths import RunDir

CALLS = []


def echo_stage(ctx, cfg):
    """A stand-in stage: copies its input folder's files and counts them."""
    CALLS.append(ctx.name)
    src = ctx.inputs["documents"]
    for path in sorted(src.iterdir()):
        (ctx.out_dir / path.name).write_bytes(path.read_bytes())
    (ctx.out_dir / ".scratch").write_text("bookkeeping, not an output")
    return {"files": len(list(src.iterdir())), "filters": {"a": {"dropped": 2}}, "names": ["x"]}


@pytest.fixture
def echo(monkeypatch):
    stage = stages.Stage("tokenizer", f"{__name__}:echo_stage", ("tokenizer",),
                         inputs={"documents": stages.Input("prepare", "documents_dir", field="tokenizer.input")})
    monkeypatch.setitem(stages.STAGES, "tokenizer", stage)
    CALLS.clear()
    return stage


def _config(tmp_path, src, **extra):
    return configlib.validate({"run": {"run_dir": str(tmp_path / "run")}, "tokenizer": {"input": str(src), **extra}})


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "b.txt").write_text("beta")
    return folder


def test_manifest_lists_outputs_counts_and_lineage(tmp_path, src, echo):
    config = _config(tmp_path, src)
    manifest = stages.execute("tokenizer", config).manifest
    on_disk = json.loads(RunDir(config.run_dir).manifest("tokenizer").read_text())
    assert on_disk.pop("manifest_sha256") and on_disk == json.loads(json.dumps(manifest))
    assert set(manifest["files"]) == {"a.txt", "b.txt"}  # dot-names are bookkeeping
    assert manifest["files"]["a.txt"] == {"sha256": io.sha256_file(src / "a.txt"), "bytes": 5}
    assert manifest["counts"] == {"files": 2, "filters.a.dropped": 2}
    assert manifest["details"] == {"names": ["x"]}
    assert manifest["config"]["tokenizer"]["vocab_size"] == 10000
    assert manifest["inputs"] == {"documents": stages.directory_fingerprint(src)}
    assert manifest["cache_key"] == stages.cache_key(echo, config)
    assert manifest["packages"]["torch"]
    assert (config.run_dir / "config.yaml").is_file()


def test_cache_key_follows_config_inputs_and_seed(tmp_path, src, echo):
    key = stages.cache_key(echo, _config(tmp_path, src))
    assert stages.cache_key(echo, _config(tmp_path, src)) == key
    assert stages.cache_key(echo, _config(tmp_path, src, vocab_size=400)) != key
    (src / "a.txt").write_text("alpha!")
    assert stages.cache_key(echo, _config(tmp_path, src)) != key
    other_seed = configlib.validate({"run": {"run_dir": str(tmp_path / "run"), "seed": 1},
                                     "tokenizer": {"input": str(src)}})
    assert stages.cache_key(echo, other_seed) != stages.cache_key(echo, _config(tmp_path, src))


def test_rerun_clears_stale_outputs(tmp_path, src, echo):
    config = _config(tmp_path, src)
    stages.execute("tokenizer", config)
    (src / "b.txt").unlink()
    manifest = stages.execute("tokenizer", config).manifest
    assert set(manifest["files"]) == {"a.txt"}
    assert not (config.run_dir / "tokenizer" / "b.txt").exists()


def test_crash_leaves_no_manifest(tmp_path, src, echo, monkeypatch):
    config = _config(tmp_path, src)
    stages.execute("tokenizer", config)

    def boom(ctx, cfg):
        (ctx.out_dir / "a.txt").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(stages.Stage, "function", lambda self: boom)
    with pytest.raises(RuntimeError):
        stages.execute("tokenizer", config)
    assert not RunDir(config.run_dir).manifest("tokenizer").exists()
    with pytest.raises(stages.StageError, match="has not completed"):
        stages.read_manifest(RunDir(config.run_dir), "tokenizer")


def test_verify_outputs_names_the_corrupt_file(tmp_path, src, echo):
    config = _config(tmp_path, src)
    stages.execute("tokenizer", config)
    target = config.run_dir / "tokenizer" / "b.txt"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(io.ChecksumError, match="b.txt"):
        stages.verify_outputs(RunDir(config.run_dir), "tokenizer")


def test_plan_follows_dependencies(tmp_path, src):
    with_input = configlib.validate({"tokenizer": {"input": str(src)}, "shard": {"input": str(src)}})
    assert stages.plan_stages(with_input, "shard") == ["tokenizer", "shard"]
    assert stages.plan_stages(configlib.RunConfig(), "shard") == ["crawl", "prepare", "tokenizer", "shard"]


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "state.json"
    io.write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"step": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]
