"""The stages of the pipeline and the one function that runs any of them.

A stage is a plain function `fn(ctx, *sections) -> counts` living in the library. `execute`
wraps it the same way for the CLI, `python -m`, and the Prefect tasks: work out the cache key
from the stage's config, its inputs' fingerprints and its code, prepare the stage folder, run,
hash the outputs and write `manifest.json` last, atomically.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from llmpipe import io
from llmpipe.config import RunConfig, TrainSection, dump
from llmpipe.errors import UserError
from llmpipe.faults import fault_point
from llmpipe.paths import MANIFEST, RunDir
from llmpipe.tracking import NullTracker, Tracker


class StageError(UserError):
    """A stage cannot run: a missing input, or an input that fails verification."""


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported only when the stage runs
    sections: tuple[str, ...]  # the config sections the function receives, in order
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads
    input_field: str | None = None  # when this field of the first section is set, it replaces upstream[-1]
    resumable: bool = False  # keep partial outputs of an interrupted run with the same cache key
    code: tuple[str, ...] = ()  # extra modules/packages whose source is part of the code version

    def dependencies(self, config: RunConfig) -> tuple[str, ...]:
        if self.input_field and getattr(config.section(self.sections[0]), self.input_field) is not None:
            return self.upstream[:-1]
        return self.upstream

    def external_input(self, config: RunConfig) -> Path | None:
        if self.input_field is None:
            return None
        return getattr(config.section(self.sections[0]), self.input_field)

    def function(self) -> Callable[..., dict]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        Stage("crawl", "llmpipe.data.crawl:crawl_stage", ("crawl",), resumable=True),
        Stage("prepare", "llmpipe.data.prepare:prepare_stage", ("prepare",), upstream=("crawl",), resumable=True),
        Stage("tokenizer", "llmpipe.tokenizer.train:tokenizer_stage", ("tokenizer",),
              upstream=("prepare",), input_field="input", code=("llmpipe.data.documents",)),
        Stage("shard", "llmpipe.data.shard:shard_stage", ("shard",),
              upstream=("tokenizer", "prepare"), input_field="input",
              code=("llmpipe.data.documents", "llmpipe.data.shards", "llmpipe.tokenizer")),
        Stage("pretrain", "llmpipe.training.pretrain:pretrain_stage", ("model", "pretrain"),
              upstream=("tokenizer", "shard"), resumable=True,
              code=("llmpipe.model", "llmpipe.training", "llmpipe.data.shards")),
    ]
}
STAGE_ORDER = ["crawl", "prepare", "tokenizer", "shard", "pretrain", "sft", "reward", "ppo", "dpo", "eval"]


def stage_names() -> list[str]:
    """The stages that exist, in pipeline order."""
    return [name for name in STAGE_ORDER if name in STAGES]


def plan_stages(config: RunConfig, until: str | None = None) -> list[str]:
    """The stages to run for `until` (default: the last one), each after its dependencies."""
    names = stage_names()
    target = until or names[-1]
    if target not in STAGES:
        raise StageError(f"unknown stage {target!r}; stages: {', '.join(names)}")
    needed: set[str] = set()
    todo = [target]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(STAGES[name].dependencies(config))
    return [name for name in names if name in needed]


# --- fingerprints and cache keys ---------------------------------------------------------------


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _source_files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise StageError(f"cannot locate module {module}")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: all its sources
        return sorted(origin.parent.rglob("*.py"))
    return [origin]


def code_version(stage: Stage) -> str:
    """sha256 of the stage's source files: editing the code reruns the stage."""
    digest = hashlib.sha256()
    modules = [stage.target.partition(":")[0], *stage.code]
    for path in sorted({p for m in modules for p in _source_files(m)}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def config_hash(stage: Stage, config: RunConfig) -> str:
    return _sha256_json({"seed": config.run.seed, **{s: config.section(s).cache_dump() for s in stage.sections}})


def directory_fingerprint(path: Path) -> str:
    """sha256 over (relative path, sha256) of every file below `path`, or of the file itself."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _sha256_json([(str(p.relative_to(path)) if p != path else p.name, io.sha256_file(p)) for p in files])


def read_manifest(run_dir: RunDir, stage: str) -> dict:
    path = run_dir.manifest(stage)
    if not path.is_file():
        raise StageError(f"stage {stage!r} has not completed: {path} is missing (run `llmpipe {stage}` first)")
    return json.loads(path.read_text())


def input_fingerprints(stage: Stage, config: RunConfig) -> dict[str, str]:
    run_dir = RunDir(config.run_dir)
    prints = {name: read_manifest(run_dir, name)["fingerprint"] for name in stage.dependencies(config)}
    external = stage.external_input(config)
    if external is not None:
        prints[str(external)] = directory_fingerprint(external)
    return prints


def cache_key(stage: Stage, config: RunConfig, inputs: dict[str, str] | None = None, code: str | None = None) -> str:
    """What decides whether a stage's outputs are current: its config, its inputs and its code."""
    inputs = input_fingerprints(stage, config) if inputs is None else inputs
    return _sha256_json({"stage": stage.name, "config": config_hash(stage, config),
                         "inputs": inputs, "code": code or code_version(stage)})


def is_current(name: str, config: RunConfig, key: str) -> bool:
    """True when the stage's manifest on disk was written for `key`."""
    path = RunDir(config.run_dir).manifest(name)
    return path.is_file() and json.loads(path.read_text()).get("cache_key") == key


# --- running -----------------------------------------------------------------------------------


@dataclass
class StageContext:
    """What a stage function gets besides its own config sections."""

    name: str
    run_dir: RunDir
    out_dir: Path  # the stage's folder; it is empty unless a resumable run left state here
    seed: int
    tracker: Tracker = field(default_factory=NullTracker)


def _prepare_out_dir(stage: Stage, out_dir: Path, key: str) -> None:
    key_file = out_dir / ".cache_key"
    resuming = stage.resumable and key_file.is_file() and key_file.read_text() == key
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if not resuming and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_text(key_file, key)


def _output_files(out_dir: Path) -> dict[str, dict]:
    """Every file the stage wrote, except the manifest and hidden bookkeeping (dot-names)."""
    files = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if path.is_file() and rel.name != MANIFEST and not any(part.startswith(".") for part in rel.parts):
            files[str(rel)] = {"sha256": io.sha256_file(path), "bytes": path.stat().st_size}
    return files


def _split_counts(result: dict) -> tuple[dict[str, float], dict]:
    """Numbers (nested dicts flattened with dots) become metrics; everything else stays in the manifest."""
    metrics, details = {}, {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            details[prefix] = value
        elif isinstance(value, (int, float)):
            metrics[prefix] = value
        elif isinstance(value, dict) and value and all(isinstance(v, (int, float, dict)) for v in value.values()):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            details[prefix] = value

    for key, value in result.items():
        walk(key, value)
    return metrics, details


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("llmpipe", "torch", "tokenizers", "pyarrow", "datatrove", "prefect", "mlflow", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _call_stage_function(stage: Stage, ctx: StageContext, sections: list, config: RunConfig) -> dict:
    """Run the stage's function in this process, or in `nproc` torchrun workers for a training stage."""
    nproc = max((s.nproc for s in sections if isinstance(s, TrainSection)), default=1)
    if nproc == 1:
        return stage.function()(ctx, *sections)
    from llmpipe.distributed.launch import run_workers  # only here: the package may import torch

    return run_workers(ctx, config, nproc)


def execute(name: str, config: RunConfig, tracker: Tracker | None = None) -> dict:
    """Run one stage to completion and return its manifest."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(stage_names())}")
    stage, run_dir, tracker = STAGES[name], RunDir(config.run_dir), tracker or NullTracker()
    inputs, code = input_fingerprints(stage, config), code_version(stage)
    key = cache_key(stage, config, inputs, code)
    out_dir = run_dir.stage(name)
    _prepare_out_dir(stage, out_dir, key)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    io.write_text(run_dir.config_file, dump(config))

    sections = [config.section(s) for s in stage.sections]
    tracker.log_params({f"{s}.{k}": v for s, sec in zip(stage.sections, sections)
                        for k, v in _flatten(sec.model_dump(mode="json")).items()})
    tracker.log_inputs({dep: (str(run_dir.manifest(dep)) if dep in STAGES else dep, fp) for dep, fp in inputs.items()})

    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    ctx = StageContext(name=name, run_dir=run_dir, out_dir=out_dir, seed=config.run.seed, tracker=tracker)
    result = _call_stage_function(stage, ctx, sections, config) or {}
    wall = time.perf_counter() - t0

    fault_point(name, "before_manifest")
    files = _output_files(out_dir)
    metrics, details = _split_counts(result)
    manifest = {
        "stage": name,
        "config": {s: sec.model_dump(mode="json") for s, sec in zip(stage.sections, sections)},
        "seed": config.run.seed,
        "config_hash": config_hash(stage, config),
        "inputs": inputs,
        "code_version": code,
        "cache_key": key,
        "git_commit": _git_commit(),
        "packages": _package_versions(),
        "files": files,
        "fingerprint": _sha256_json({k: v["sha256"] for k, v in files.items()}),
        "counts": metrics,
        "details": details,
        "started_at": started.isoformat(),
        "wall_time_s": round(wall, 3),
    }
    io.write_json(run_dir.manifest(name), manifest)
    tracker.log_metrics({**metrics, "wall_time_s": wall})
    tracker.log_artifact(run_dir.manifest(name))
    return manifest


def verify_outputs(run_dir: RunDir, stage: str, names: list[str] | None = None) -> dict:
    """Re-hash a completed stage's files against its manifest; raise naming the first bad file."""
    manifest = read_manifest(run_dir, stage)
    for rel, meta in manifest["files"].items():
        if names is None or rel in names:
            path = run_dir.stage(stage) / rel
            if not path.is_file():
                raise io.ChecksumError(f"{path}: listed in {stage}/manifest.json but missing")
            io.verify_sha256(path, meta["sha256"])
    return manifest


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
