"""The stages of the pipeline and the one function that runs any of them.

A stage is a plain function `fn(ctx, *sections) -> counts` living in the library. `execute`
wraps it the same way for the CLI, `python -m`, and the Prefect tasks: work out the cache key
from the stage's config, its inputs' fingerprints and its code, prepare the stage folder, run,
hash the outputs and write `manifest.json` last, atomically.

The manifest says what was made from what, and nothing about this run in particular: the same
inputs give the same bytes, wherever the run directory is. Measurements of the run (wall time,
throughput: what a stage returns under `"timing"`), its start time and the git commit go to
MLflow and the terminal only.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import graphlib
import heapq
import importlib
import os
import platform
import shutil
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from llmpipe import code_version as code_versions
from llmpipe import console, io
from llmpipe.config import RunConfig, TrainSection, dump
from llmpipe.context import StageContext, as_paths
from llmpipe.errors import UserError
from llmpipe.faults import fault_point
from llmpipe.paths import MANIFEST, RunDir
from llmpipe.tracking import NullTracker, Tracker


class StageError(UserError):
    """A stage cannot run: a missing input, or an input that fails verification."""


class StagesFailed(Exception):
    """Stages of a flow run failed; the others ran to the end. Each failure is in its stage's log."""

    def __init__(self, names: list[str], run_dir: Path):
        logs = ", ".join(str(RunDir(run_dir).stage_log(name)) for name in names)
        super().__init__(f"stage{'s' if len(names) > 1 else ''} {', '.join(names)} failed (log: {logs})")


@dataclass(frozen=True)
class Input:
    """One named input of a stage: an upstream stage's output, or a path the config gives instead."""

    stage: str | None = None  # the stage that writes it; None: only the config can give it
    output: str | None = None  # the RunDir property naming that output; None: the stage's whole folder
    field: str | None = None  # "section.key" of a config path that, when set, replaces the upstream output

    def external(self, config: RunConfig) -> Path | list[Path] | None:
        """The config's path (or list of paths) for this input, when the config gives one."""
        if self.field is None:
            return None
        section, key = self.field.split(".")
        return getattr(config.section(section), key)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported only when the stage runs
    sections: tuple[str, ...]  # the config sections the function receives, in order
    inputs: dict[str, Input] = field(default_factory=dict)  # what it reads, as ctx.inputs[name]
    methods: tuple[str, ...] = ()  # align.methods that put it in the graph; empty: always in it
    resumable: bool = False  # keep partial outputs of an interrupted run with the same cache key
    code: tuple[str, ...] = ()  # modules it starts by name (`python -m`), which no import reaches
    fingerprint_python: bool = False  # its outputs depend on the Python version (what it reads of the stdlib)
    own_process: bool = False  # computes with torch: runs in a worker process, one such stage at a time
    summary: tuple[str, ...] = ()  # the counts the console shows when it ends
    # "module:function(section, stage_dir) -> int | None": a refresh generation in the cache key, so a run with the
    # same config can run the stage again (a recrawl); its folder is kept for it. None: the key is the config's
    refresh: str | None = None
    fingerprint_files: tuple[str, ...] = ()  # glob patterns of the outputs that are its fingerprint; empty: all
    kept_on_refresh: bool = False  # with crawl.refresh, new inputs keep its outputs (unless <section>.retrain_on_refresh)
    # with crawl.refresh and <section>.refresh: continue, new inputs continue from its last result (input `continue_from`)
    continues_on_refresh: bool = False

    def enabled(self, config: RunConfig) -> bool:
        return not self.methods or any(method in config.align.methods for method in self.methods)

    def active_inputs(self, config: RunConfig) -> dict[str, Input]:
        """The inputs it reads under `config`: an input from a stage that is off is left out."""
        return {name: spec for name, spec in self.inputs.items()
                if spec.stage is None or spec.external(config) is not None or STAGES[spec.stage].enabled(config)}

    def dependencies(self, config: RunConfig | None = None) -> tuple[str, ...]:
        """The stages it reads from; with no config, every stage it may read from."""
        specs = self.inputs.values() if config is None else self.active_inputs(config).values()
        names = [spec.stage for spec in specs if spec.stage and (config is None or spec.external(config) is None)]
        return tuple(dict.fromkeys(names))

    def input_paths(self, config: RunConfig) -> dict[str, Path]:
        run_dir, paths = RunDir(config.run_dir), {}
        for name, spec in self.active_inputs(config).items():
            external = spec.external(config)
            if external is not None:
                paths[name] = external
            elif spec.stage is None:
                raise StageError(f"stage {self.name!r} needs {spec.field} (a path) in the config")
            else:
                paths[name] = getattr(run_dir, spec.output) if spec.output else run_dir.stage(spec.stage)
        return paths

    def function(self) -> Callable[..., dict]:
        return _import(self.target)

    def refresh_token(self, config: RunConfig) -> int | None:
        if self.refresh is None:
            return None
        return _import(self.refresh)(config.section(self.sections[0]), RunDir(config.run_dir).stage(self.name))

    def fingerprint(self, files: dict[str, dict]) -> str:
        """sha256 over the sha256 of its outputs (those `fingerprint_files` name): what later stages' keys see."""
        chosen = [rel for rel in files if not self.fingerprint_files
                  or any(fnmatch.fnmatch(rel, pattern) for pattern in self.fingerprint_files)]
        return _sha256_json({rel: files[rel]["sha256"] for rel in chosen})


def _import(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        # its fingerprint is what it found (pages.jsonl: URL, payload digest, record; WET files), not the WARCs'
        # bytes, which carry dates and record ids: a recrawl of an unchanged site leaves every later stage cached
        Stage("crawl", "llmpipe.data.crawl:crawl_stage", ("crawl",), resumable=True,
              code=("llmpipe.data._crawl_scrapy",), summary=("pages_fetched", "html_bytes"),
              refresh="llmpipe.data.crawl:refresh_generation", fingerprint_files=("pages.jsonl", "wet/*")),
        Stage("prepare", "llmpipe.data.prepare:prepare_stage", ("prepare",),
              inputs={"warc": Input("crawl", "warc_dir"), "wet": Input("crawl", "wet_dir"),
                      "pages": Input("crawl", "crawl_pages")}, resumable=True,
              summary=("pages_in", "documents", "text_bytes")),
        Stage("tokenizer", "llmpipe.tokenizer.train:tokenizer_stage", ("tokenizer",),
              inputs={"documents": Input("prepare", "documents_dir", field="tokenizer.input")}, kept_on_refresh=True,
              summary=("documents", "vocab_size")),
        Stage("shard", "llmpipe.data.shard:shard_stage", ("shard",),
              inputs={"tokenizer": Input("tokenizer", "tokenizer_dir"),
                      "documents": Input("prepare", "documents_dir", field="shard.input")},
              summary=("train_tokens", "val_tokens", "train_shards")),
        Stage("pretrain", "llmpipe.training.pretrain:pretrain_stage", ("model", "pretrain"),
              inputs={"tokenizer": Input("tokenizer", "tokenizer_dir"), "shards": Input("shard", "shards_dir")},
              resumable=True, own_process=True, continues_on_refresh=True, summary=("steps", "train_loss", "val_loss", "tokens_per_s")),
        Stage("instruct", "llmpipe.alignment.instruct:instruct_stage", ("instruct",), fingerprint_python=True,
              summary=("sft_train", "preferences_train", "prompts_train")),
        Stage("sft", "llmpipe.alignment.sft:sft_stage", ("model", "sft"),
              inputs={"base": Input("pretrain"), "tokenizer": Input("tokenizer", "tokenizer_dir"),
                      "data": Input("instruct", "sft_train_file", field="sft.data"),
                      "heldout": Input("instruct", "sft_heldout_file", field="sft.heldout_data"),
                      "prompts": Input("instruct", "prompts_heldout_file")},
              resumable=True, own_process=True, summary=("steps", "heldout_loss_base", "heldout_loss", "task_accuracy_base",
                                       "task_accuracy")),
        Stage("dpo_reference", "llmpipe.alignment.dpo_reference:reference_stage", ("model", "dpo_reference"),
              inputs={"reference": Input("sft"), "tokenizer": Input("tokenizer", "tokenizer_dir"),
                      "data": Input("instruct", "preferences_train_file", field="dpo.data"),
                      "heldout": Input("instruct", "preferences_heldout_file", field="dpo.heldout_data")},
              methods=("dpo",), own_process=True, summary=("train_pairs", "heldout_pairs", "heldout_pref_accuracy")),
        Stage("dpo", "llmpipe.alignment.dpo:dpo_stage", ("model", "dpo"),
              inputs={"sft": Input("sft"), "reference": Input("dpo_reference"),
                      "tokenizer": Input("tokenizer", "tokenizer_dir"),
                      "data": Input("instruct", "preferences_train_file", field="dpo.data"),
                      "heldout": Input("instruct", "preferences_heldout_file", field="dpo.heldout_data")},
              methods=("dpo",), resumable=True, own_process=True, summary=("steps", "pref_accuracy_sft", "pref_accuracy")),
        Stage("reward", "llmpipe.alignment.reward:reward_stage", ("model", "reward"),
              inputs={"sft": Input("sft"), "tokenizer": Input("tokenizer", "tokenizer_dir"),
                      "data": Input("instruct", "preferences_train_file", field="reward.data"),
                      "heldout": Input("instruct", "preferences_heldout_file", field="reward.heldout_data")},
              methods=("ppo",), resumable=True, own_process=True,
              summary=("steps", "heldout_pairwise_accuracy", "heldout_margin")),
        Stage("ppo", "llmpipe.alignment.ppo:ppo_stage", ("model", "ppo"),
              inputs={"sft": Input("sft"), "reward": Input("reward"), "tokenizer": Input("tokenizer", "tokenizer_dir"),
                      "data": Input("instruct", "prompts_train_file", field="ppo.data"),
                      "heldout": Input("instruct", "prompts_heldout_file", field="ppo.heldout_data")},
              methods=("ppo",), resumable=True, own_process=True,
              summary=("steps", "rm_score_sft", "rm_score", "heldout_kl", "task_accuracy")),
        # after every stage: the report covers them all (its funnel, curves and stage table read their folders)
        Stage("eval", "llmpipe.eval.evaluate:eval_stage", ("eval",),
              inputs={"crawl": Input("crawl"), "prepare": Input("prepare"), "documents": Input("prepare", "documents_dir"),
                      "tokenizer": Input("tokenizer"), "shard": Input("shard"),
                      "pretrain": Input("pretrain"), "instruct": Input("instruct"), "sft": Input("sft"),
                      "dpo_reference": Input("dpo_reference"), "dpo": Input("dpo"), "reward": Input("reward"),
                      "ppo": Input("ppo"), "task_dirs": Input(field="eval.task_dirs")},
              own_process=True, summary=("unigram_bpb", "pretrain.val_bpb", "sft.task_accuracy", "ppo.task_accuracy")),
    ]
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(stage_names())}")
    return STAGES[name]


def _topological(graph: dict[str, tuple[str, ...]]) -> list[str]:
    """`graph`'s nodes, each after its dependencies; of the stages ready, the first registered goes
    first (so the default data for post-training comes after pretraining, as it is registered)."""
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        raise StageError(f"the stages form a cycle: {' -> '.join(err.args[1])}") from None
    rank = {name: i for i, name in enumerate(STAGES)}
    order: list[str] = []
    ready: list[tuple[int, str]] = []
    while sorter.is_active():
        for name in sorter.get_ready():
            heapq.heappush(ready, (rank[name], name))
        _, name = heapq.heappop(ready)
        order.append(name)
        sorter.done(name)
    return order


def stage_graph(config: RunConfig | None = None) -> dict[str, tuple[str, ...]]:
    """Stage -> the stages it reads from: every registered stage, or those `config` turns on."""
    return {name: stage.dependencies(config) for name, stage in STAGES.items()
            if config is None or stage.enabled(config)}


def stage_names(config: RunConfig | None = None) -> list[str]:
    """The stages in dependency order (all registered ones, or those `config` turns on)."""
    return _topological(stage_graph(config))


def plan_stages(config: RunConfig, until: str | list[str] | None = None, only: str | None = None) -> list[str]:
    """The stages to run, each after its dependencies: `only` alone, or everything `until` needs
    (default: every stage the config turns on)."""
    graph = stage_graph(config)
    targets = [only] if only else [until] if isinstance(until, str) else list(until or graph)
    for name in targets:
        get_stage(name)
        if name not in graph:
            raise StageError(f"stage {name!r} is off: align.methods={config.align.methods} "
                             f"does not include {' or '.join(STAGES[name].methods)}")
    if only:
        for dependency in graph[only]:  # its inputs must be in the run directory already
            read_manifest(RunDir(config.run_dir), dependency)
        return [only]
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(graph[name])
    return [name for name in _topological(graph) if name in needed]


# --- fingerprints and cache keys ---------------------------------------------------------------


_sha256_json = io.sha256_json


def code_version(stage: Stage, root: Path | None = None) -> str:
    """sha256 of the llmpipe modules the stage's code imports: editing them reruns the stage."""
    return code_versions.code_version([stage.target.partition(":")[0], *stage.code], root)


def config_hash(stage: Stage, config: RunConfig) -> str:
    hashed = {"seed": config.run.seed, **{s: config.section(s).cache_dump() for s in stage.sections}}
    if stage.fingerprint_python:
        hashed["python"] = platform.python_version()
    return _sha256_json(hashed)


def directory_fingerprint(path: Path) -> str:
    """sha256 over (relative path, sha256) of every file below `path`, or of the file itself."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _sha256_json([(str(p.relative_to(path)) if p != path else p.name, io.sha256_file(p)) for p in files])


def read_manifest(run_dir: RunDir, stage: str) -> dict:
    path = run_dir.manifest(stage)
    if not path.is_file():
        raise StageError(f"stage {stage!r} has not completed: {path} is missing (run `llmpipe {stage}` first)")
    return io.read_manifest(path.parent)


def external_fingerprints(config: RunConfig, names: list[str]) -> dict[str, str]:
    """{path: fingerprint} of the config-given inputs of these stages, each hashed once however many read it."""
    paths = {str(path) for name in names for spec in STAGES[name].active_inputs(config).values()
             if spec.external(config) is not None for path in as_paths(spec.external(config))}
    return {path: directory_fingerprint(Path(path)) for path in sorted(paths)}


def input_fingerprints(stage: Stage, config: RunConfig, external: dict[str, str] | None = None) -> dict[str, str]:
    """Input name -> fingerprint: an upstream stage's manifest fingerprint, or the hash of a config-given path
    (taken from `external` when the flow hashed it already)."""
    run_dir, external = RunDir(config.run_dir), external or {}
    stage.input_paths(config)  # a required config path that is not set fails here, naming the key
    kept = _kept_on_refresh(stage, config)
    if kept is not None:
        return kept
    prints = {}
    for name, spec in stage.active_inputs(config).items():
        given = spec.external(config)
        if given is None:
            prints[name] = read_manifest(run_dir, spec.stage)["fingerprint"]
        else:
            each = [external.get(str(path)) or directory_fingerprint(path) for path in as_paths(given)]
            prints[name] = each[0] if not isinstance(given, list) else _sha256_json(each)
    previous = _continued(stage, config, prints)
    if previous is not None:
        prints[CONTINUE_FROM] = previous
    return prints


CONTINUE_FROM = "continue_from"  # the input of a refreshed stage that continues its last result


def _continuing(stage: Stage, config: RunConfig) -> bool:
    return (stage.continues_on_refresh and config.crawl.refresh != "never"
            and config.section(stage.sections[-1]).refresh == "continue")


def _manifest_or_none(folder: Path) -> dict | None:
    try:
        return io.read_manifest(folder) if (folder / MANIFEST).is_file() else None
    except io.ChecksumError:
        return None


def _continued(stage: Stage, config: RunConfig, prints: dict[str, str]) -> str | None:
    """The `continue_from` fingerprint of a continuing stage: the one its manifest recorded while its
    other inputs are the same (cached); else its last result's, that of its folder, or the copy kept
    when a continued run was interrupted (`.continue/<stage>`); None to start afresh."""
    if not _continuing(stage, config):
        return None
    run_dir, section = RunDir(config.run_dir), config.section(stage.sections[-1])
    current = _manifest_or_none(run_dir.stage(stage.name))
    if current is not None and {k: v for k, v in current["inputs"].items() if k != CONTINUE_FROM} == prints:
        return current["inputs"].get(CONTINUE_FROM)
    previous = current if current is not None else _manifest_or_none(run_dir.continue_dir(stage.name))
    model = stage.sections[:-1]
    if previous is None or any(previous["config"][name] != config.section(name).model_dump(mode="json") for name in model):
        return None  # another model: nothing to continue
    return _sha256_json({"previous": previous["fingerprint"], "steps": section.refresh_steps})


def _keep_for_continuing(stage: Stage, run_dir: RunDir) -> None:
    """Before a continuing stage's folder is cleared: its manifest and final checkpoint to `.continue/<stage>`
    (hard links: no copy of the weights; the folder is replaced at once, so a kill leaves the old copy or the new)."""
    folder, manifest = run_dir.stage(stage.name), _manifest_or_none(run_dir.stage(stage.name))
    if manifest is None:
        return  # an interrupted continued run: the copy kept before it is the one to continue
    final = run_dir.checkpoints_dir(stage.name) / f"step_{int(manifest['counts']['steps']):07d}"
    kept, staging = run_dir.continue_dir(stage.name), run_dir.continue_dir(stage.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(final, staging / "checkpoints" / final.name, copy_function=os.link)
    shutil.copy2(folder / MANIFEST, staging / MANIFEST)
    shutil.rmtree(kept.with_name(kept.name + ".old"), ignore_errors=True)
    if kept.exists():
        os.replace(kept, kept.with_name(kept.name + ".old"))
    os.replace(staging, kept)
    shutil.rmtree(kept.with_name(kept.name + ".old"), ignore_errors=True)


def _kept_on_refresh(stage: Stage, config: RunConfig) -> dict[str, str] | None:
    """The inputs a kept stage's manifest recorded: a refreshing run keeps the tokenizer it has while the
    tokenizer's config and code are the same, whatever the new corpus is."""
    if not stage.kept_on_refresh or config.crawl.refresh == "never":
        return None
    if getattr(config.section(stage.sections[0]), "retrain_on_refresh", False):
        return None
    path = RunDir(config.run_dir).manifest(stage.name)
    try:
        manifest = io.read_manifest(path.parent) if path.is_file() else None
    except io.ChecksumError:
        return None
    if manifest is None or manifest["config_hash"] != config_hash(stage, config) or \
            manifest["code_version"] != code_version(stage) or set(manifest["inputs"]) != set(stage.active_inputs(config)):
        return None
    return manifest["inputs"]


def cache_key(stage: Stage, config: RunConfig, inputs: dict[str, str] | None = None, code: str | None = None,
              external: dict[str, str] | None = None, refresh: bool = True) -> str:
    """What decides whether a stage's outputs are current: its config, its inputs, its code and, for a
    stage that refreshes, the generation it is at (`refresh=False`: the key without it, under which
    its folder is kept). `inputs` are computed when not given (`external`: as for `input_fingerprints`)."""
    inputs = input_fingerprints(stage, config, external) if inputs is None else inputs
    hashed = {"stage": stage.name, "config": config_hash(stage, config), "inputs": inputs,
              "code": code or code_version(stage)}
    generation = stage.refresh_token(config) if refresh else None
    if generation is not None:
        hashed["refresh"] = generation
    return _sha256_json(hashed)


def is_current(name: str, config: RunConfig, key: str) -> bool:
    """True when the stage's manifest on disk was written for `key` (and not changed since: an edited
    manifest is no cache, so the stage is rebuilt)."""
    path = RunDir(config.run_dir).manifest(name)
    try:
        return path.is_file() and io.read_manifest(path.parent).get("cache_key") == key
    except io.ChecksumError:
        return False


# --- running -----------------------------------------------------------------------------------


# MLflow creates a dataset row on first use without a lock: two branches reading the same
# upstream output at once would both try to insert it.
_LOG_INPUTS = threading.Lock()


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


# Stages that compute with the model run one at a time, each in a process of its own: torch's
# global seed and thread count belong to a process, so a training stage beside another in this
# process's threads (`run.max_parallel_stages`) would get numbers that depend on its neighbour,
# and two at once would each spawn a thread per core.
_MODEL_STAGES = threading.Lock()


def _call_stage_function(stage: Stage, ctx: StageContext, sections: list, config: RunConfig) -> dict:
    """Run the stage's function in this process, or, for a stage that computes with torch, in a
    worker process (`nproc` torchrun workers for a training stage with nproc > 1)."""
    if not stage.own_process:
        return stage.function()(ctx, *sections)
    from llmpipe.distributed.launch import run_workers  # only here: the package may import torch

    train = next((s for s in sections if isinstance(s, TrainSection)), None)
    with _MODEL_STAGES:
        if train is None:
            return run_workers(ctx, config, 1)
        return run_workers(ctx, config, train.nproc, nnodes=train.nnodes, launcher=train.launcher,
                           rdzv_endpoint=train.rdzv_endpoint)


@dataclass
class StageRun:
    """What `execute` returns: the manifest as written, and this run's own measurements."""

    manifest: dict
    wall_time_s: float
    timing: dict[str, float]  # the stage's run-specific metrics (seconds, rates), flattened

    @property
    def counts(self) -> dict[str, float]:
        """Counts and timings: what the terminal line and the Prefect artifact show."""
        return {**self.manifest["counts"], **self.timing}


def execute(name: str, config: RunConfig, tracker: Tracker | None = None,
            external: dict[str, str] | None = None) -> StageRun:
    """Run one stage to completion. Its output goes to its log file; the terminal gets a line when
    it starts and one when it ends. `external`: fingerprints of config-given inputs that the
    caller hashed already (`external_fingerprints`)."""
    stage, run_dir, tracker = get_stage(name), RunDir(config.run_dir), tracker or NullTracker()
    log_path = run_dir.stage_log(name)
    console.stage_line(name, "started")
    t0 = time.perf_counter()
    try:
        try:
            with console.stage_output(log_path) as log:
                try:
                    run = _execute(stage, config, run_dir, tracker, external)
                except BaseException:
                    with contextlib.suppress(OSError):  # the disk may be full
                        traceback.print_exc(file=log)  # the terminal gets one line; the log gets the whole story
                    raise
        finally:
            if log_path.is_file():
                tracker.log_artifact(log_path)
    except BaseException as err:
        disk_full = _disk_full(name, run_dir, err)
        shown = disk_full or err
        console.stage_line(name, "failed", time.perf_counter() - t0, f"{type(shown).__name__}: {shown} (log: {log_path})")
        if disk_full:
            raise disk_full from err
        raise
    console.stage_line(name, "ran", run.wall_time_s, console.format_counts(run.counts, stage.summary))
    return run


class DiskFull(StageError):
    """A stage ran out of disk space. Its own folder has no manifest (it reruns); finished stages are untouched."""


def _disk_full(name: str, run_dir: RunDir, err: BaseException) -> DiskFull | None:
    """`err` (here or in a worker, whose failure carries its errno) as a DiskFull, when it is one."""
    error = err
    while error is not None and getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
        error = error.__context__  # a write that failed while another failure was being logged
    if error is None:
        return None
    folder = next(p for p in (run_dir.stage(name), *run_dir.stage(name).parents) if p.exists())
    free = shutil.disk_usage(folder).free
    return DiskFull(f"{name} ran out of disk space ({os.strerror(error.errno)}) with {free:,} bytes "
                    f"free under {folder}: the stages that finished are intact and stay cached; free space and rerun")


def _execute(stage: Stage, config: RunConfig, run_dir: RunDir, tracker: Tracker,
             external: dict[str, str] | None) -> StageRun:
    name = stage.name
    inputs, code = input_fingerprints(stage, config, external), code_version(stage)
    key = cache_key(stage, config, inputs, code)
    paths = stage.input_paths(config)
    out_dir = run_dir.stage(name)
    if CONTINUE_FROM in inputs:
        if not is_current(name, config, key):
            _keep_for_continuing(stage, run_dir)
        paths[CONTINUE_FROM] = run_dir.continue_dir(name)
    _prepare_out_dir(stage, out_dir, cache_key(stage, config, inputs, code, refresh=False))
    run_dir.root.mkdir(parents=True, exist_ok=True)
    io.write_text(run_dir.config_file, dump(config))

    sections = [config.section(s) for s in stage.sections]
    tracker.log_params({f"{s}.{k}": v for s, sec in zip(stage.sections, sections)
                        for k, v in _flatten(sec.model_dump(mode="json")).items()})
    sources = {input_name: paths[input_name] if spec.external(config) is not None else run_dir.manifest(spec.stage)
               for input_name, spec in stage.active_inputs(config).items()}
    if CONTINUE_FROM in inputs:
        sources[CONTINUE_FROM] = run_dir.continue_dir(name) / MANIFEST
    with _LOG_INPUTS:
        tracker.log_inputs({input_name: (str(sources[input_name]), fp) for input_name, fp in inputs.items()})

    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    ctx = StageContext(name=name, run_dir=run_dir, out_dir=out_dir, seed=config.run.seed, inputs=paths,
                       tracker=tracker, run_name=config.run.name)
    result = dict(_call_stage_function(stage, ctx, sections, config) or {})
    wall = time.perf_counter() - t0

    fault_point(name, "before_manifest")
    io.write_json(run_dir.timing_file(name), {"wall_s": round(wall, 3)})  # hidden: not an output, the report's
    files = _output_files(out_dir)
    timing, _ = _split_counts(result.pop("timing", {}))
    metrics, details = _split_counts(result)
    manifest = {
        "stage": name,
        "config": {s: sec.model_dump(mode="json") for s, sec in zip(stage.sections, sections)},
        "seed": config.run.seed,
        "config_hash": config_hash(stage, config),
        "inputs": inputs,
        "code_version": code,
        "cache_key": key,
        "packages": _package_versions(),
        "files": files,
        "fingerprint": stage.fingerprint(files),
        "counts": metrics,
        "details": details,
    }
    io.write_manifest(out_dir, manifest)
    tracker.log_metrics({**metrics, **timing, "wall_time_s": wall})
    # the record `llmpipe reproduce` and `llmpipe compare` read (the manifest artifact has the rest)
    tracker.set_tags({"llmpipe.started_at": started.isoformat(), "llmpipe.git_commit": _git_commit() or "unknown",
                      "llmpipe.cache_key": key, "llmpipe.config_hash": manifest["config_hash"],
                      "llmpipe.code_version": code, "llmpipe.fingerprint": manifest["fingerprint"],
                      "llmpipe.seed": config.run.seed,
                      "llmpipe.packages": " ".join(f"{k}=={v}" for k, v in manifest["packages"].items())})
    tracker.log_artifact(run_dir.manifest(name))
    return StageRun(manifest, wall, timing)


def verify_outputs(run_dir: RunDir, stage: str, names: list[str] | None = None) -> dict:
    """Re-hash a completed stage's files against its manifest; raise naming the first bad file."""
    manifest = read_manifest(run_dir, stage)
    for rel, meta in manifest["files"].items():
        if names is None or rel in names:
            path = run_dir.stage(stage) / rel
            if not path.is_file():
                raise io.ChecksumError(f"{path}: listed in {stage}/manifest.json but missing{io.rebuild_hint(path)}")
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

