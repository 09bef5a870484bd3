"""A run's MLflow record, read back: what `llmpipe reproduce` rebuilds from and `llmpipe compare` compares.

A flow run's parent MLflow run holds the resolved `config.yaml`; each stage's child run holds the
stage's `manifest.json` (config hash, code version, seed, package versions, input fingerprints,
every output file's sha256), its metrics, and the crawl's WARC and WET files (under `warc/`, `wet/`). A cached stage's
child run points at the run that made its outputs (`llmpipe.source_run_id`).

What "the same" means per stage: every output file's sha256, except where an output is the
run's own by design: the crawl is compared on its WARCs (the live web is not repeatable; the
WARC is the input), and the eval stage on its report's numbers and plots (the report also holds
the stages' wall times and the registry's version, which no rerun repeats).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe import io
from llmpipe.config import read_yaml
from llmpipe.data.crawl import RAW_INPUT_FOLDERS, part_generation
from llmpipe.errors import UserError
from llmpipe.redact import redact
from llmpipe.stages import STAGES, _flatten, get_stage, stage_names

# the report's parts that are a function of the stage's inputs (`stages` has wall times, `registry` the store's state)
REPORT_NUMBERS = ("checkpoints", "baselines", "funnel", "contamination")


class RecordError(UserError):
    """A run id that is not an llmpipe run, or a record that lacks what the command needs."""


@dataclass
class StageRecord:
    name: str
    run_id: str  # the MLflow run that made the outputs (for a cached stage: the run it was cached from)
    cache_key: str
    manifest: dict
    metrics: dict[str, float]


@dataclass
class RunRecord:
    run_id: str  # the flow's parent run
    name: str
    config: dict  # the resolved config it logged
    stages: dict[str, StageRecord]  # in pipeline order


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file otherwise
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _download_json(client, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return read_yaml(local) if path.endswith(".yaml") else json.loads(Path(local).read_text())


def load_record(uri: str, run_id: str) -> RunRecord:
    """The record of a flow run, given its parent run id or any of its stage runs' ids."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RecordError(f"no MLflow run {run_id!r} in {redact(uri)}") from None
    if "llmpipe.stage" in run.data.tags and "mlflow.parentRunId" in run.data.tags:
        run = client.get_run(run.data.tags["mlflow.parentRunId"])
    if "llmpipe.run" not in run.data.tags or "llmpipe.stage" in run.data.tags:
        raise RecordError(f"MLflow run {run_id} is not an llmpipe pipeline run (run `llmpipe run` to make one)")
    parent = run.info.run_id
    try:
        config = _download_json(client, parent, "config.yaml")
    except (MlflowException, OSError):
        raise RecordError(f"MLflow run {parent} has no config.yaml artifact: its flow ended before any stage ran") from None
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    finished = {}
    for child in children:
        name = child.data.tags.get("llmpipe.stage")
        if name in STAGES and child.info.status == "FINISHED":
            finished[name] = child
    records = {}
    for name in [n for n in stage_names() if n in finished]:
        child = finished[name]
        source = client.get_run(child.data.tags.get("llmpipe.source_run_id", child.info.run_id))
        records[name] = StageRecord(name, source.info.run_id, child.data.tags.get("llmpipe.cache_key", ""),
                                    _download_json(client, source.info.run_id, "manifest.json"), dict(source.data.metrics))
    return RunRecord(parent, run.data.tags["llmpipe.run"], config, records)


# --- what is compared ------------------------------------------------------------------------------


def report_numbers(card: dict) -> dict:
    return {key: card.get(key) for key in REPORT_NUMBERS}


def comparable_files(stage: str, manifest: dict) -> dict[str, str]:
    """{file: sha256} of the outputs that the same inputs must reproduce byte for byte."""
    files = {rel: meta["sha256"] for rel, meta in manifest["files"].items()}
    if stage == "crawl":
        return {rel: sha for rel, sha in files.items() if rel.split("/")[0] in RAW_INPUT_FOLDERS}
    if stage == "eval":
        return {rel: sha for rel, sha in files.items() if rel not in ("report.json", "report.md")}
    return files


def _short(sha: str) -> str:
    return sha[:12]


def differing_files(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(rel for rel in a.keys() | b.keys() if a.get(rel) != b.get(rel))


# --- reproduce -------------------------------------------------------------------------------------


def fetch_warcs(uri: str, record: RunRecord, into: Path) -> list[Path]:
    """The crawl's WARC (and WET) files from the record, each checked against the crawl's manifest."""
    from llmpipe import io

    crawl = record.stages.get("crawl")
    if crawl is None:
        raise RecordError(f"run {record.run_id} has no finished crawl stage to take WARCs from")
    wanted = comparable_files("crawl", crawl.manifest)
    into.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    for folder in sorted({rel.split("/")[0] for rel in wanted}):
        client.download_artifacts(crawl.run_id, folder, str(into))
    paths = []
    for rel, sha in sorted(wanted.items()):
        path = into / rel
        if not path.is_file() or io.sha256_file(path) != sha:
            raise RecordError(f"{rel}: the WARC logged with crawl run {crawl.run_id} is missing or not the one "
                              f"its manifest lists (sha256 {_short(sha)})")
        paths.append(path)
    return paths


def reproduction_config(record: RunRecord, warcs: list[Path]) -> dict:
    """The recorded config, its crawl replaced by the recorded WARCs. A reproduction is a check,
    not a release: it registers no model version (the registry's state is no output anyway)."""
    config = json.loads(json.dumps(record.config))
    config["crawl"]["warc_inputs"] = [str(path) for path in warcs]
    config.setdefault("eval", {})["register_model"] = False
    return config


def replay(record: RunRecord, warcs: list[Path]) -> list[tuple[dict, list[str]]]:
    """The flow runs (config, stages to run) that rebuild the record. A refreshed run kept its tokenizer
    and continued its pretraining from earlier crawl generations: each earlier generation's WARC parts
    (their warcinfo names it) are given in turn, up to the stages that carry over to the next run, then
    all of them. This assumes every generation ran with the recorded config."""
    generations = {path: part_generation(path) if path.parent.name == "warc" else 0 for path in warcs}
    last = max(generations.values(), default=0)
    carried = [name for name in record.stages if STAGES[name].kept_on_refresh or STAGES[name].continues_on_refresh]
    runs = []
    if record.config.get("crawl", {}).get("refresh", "never") != "never" and carried:
        for generation in range(last):
            given = [path for path in warcs if generations[path] <= generation]
            runs.append((reproduction_config(record, given), carried))
    return [*runs, (reproduction_config(record, warcs), list(record.stages))]


@dataclass
class StageMatch:
    name: str
    recorded: str
    reproduced: str
    matches: bool
    differing: list[str]


def match_stages(record: RunRecord, run_dir: Path, uri: str) -> list[StageMatch]:
    """Each recorded stage against the same stage in `run_dir`."""
    from llmpipe.paths import RunDir

    run, results = RunDir(run_dir), []
    for name, stage in record.stages.items():
        recorded = comparable_files(name, stage.manifest)
        manifest_path = run.manifest(name)
        if not manifest_path.is_file():
            results.append(StageMatch(name, _short(io.sha256_json(recorded)), "missing", False, ["manifest.json"]))
            continue
        reproduced = comparable_files(name, io.read_manifest(manifest_path.parent))
        if name == "eval":  # the report's numbers, alongside its plots and task files
            recorded["report numbers"] = io.sha256_json(report_numbers(_download_json(_client(uri), stage.run_id, "report/report.json")))
            reproduced["report numbers"] = io.sha256_json(report_numbers(json.loads(run.report_json.read_text())))
        differing = differing_files(recorded, reproduced)
        results.append(StageMatch(name, _short(io.sha256_json(recorded)), _short(io.sha256_json(reproduced)), not differing, differing))
    return results


def format_matches(matches: list[StageMatch]) -> str:
    width = max(len(m.name) for m in matches)
    lines = [f"{'stage':<{width}}  {'recorded':<12}  {'reproduced':<12}  result"]
    for m in matches:
        shown = ", ".join(m.differing[:3]) + (f" and {len(m.differing) - 3} more" if len(m.differing) > 3 else "")
        lines.append(f"{m.name:<{width}}  {m.recorded:<12}  {m.reproduced:<12}  "
                     f"{'same' if m.matches else 'DIFFERS: ' + shown}")
    return "\n".join(lines)


# --- compare ---------------------------------------------------------------------------------------


def config_differences(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in a, value in b)} of every key whose values differ (run.name aside)."""
    flat_a, flat_b = _flatten(a), _flatten(b)  # the config is a tree of sections
    missing = object()
    return {key: (flat_a.get(key), flat_b.get(key)) for key in sorted(flat_a.keys() | flat_b.keys())
            if key != "run.name" and flat_a.get(key, missing) != flat_b.get(key, missing)}


def why_different(name: str, a: StageRecord, b: StageRecord, config_diff: dict[str, tuple[Any, Any]]) -> str:
    """What made one stage's cache key differ: its config, its code or an input."""
    reasons = []
    if a.manifest.get("config_hash") != b.manifest.get("config_hash"):
        sections = (*get_stage(name).sections, "run.seed")
        keys = [k for k in config_diff if k.startswith(tuple(f"{s}." for s in sections)) or k == "run.seed"]
        shown = "; ".join(f"{k}: {json.dumps(config_diff[k][0])} -> {json.dumps(config_diff[k][1])}" for k in keys)
        reasons.append(f"its config ({shown or 'the Python version, which its outputs depend on'})")
    if a.manifest.get("code_version") != b.manifest.get("code_version"):
        reasons.append(f"its code (code version {_short(a.manifest['code_version'])} -> {_short(b.manifest['code_version'])})")
    inputs_a, inputs_b = a.manifest.get("inputs", {}), b.manifest.get("inputs", {})
    changed = sorted(k for k in inputs_a.keys() | inputs_b.keys() if inputs_a.get(k) != inputs_b.get(k))
    if changed:
        reasons.append(f"its input{'s' if len(changed) > 1 else ''} {', '.join(changed)}")
    return " and ".join(reasons) or "its cache key (same config, code and inputs: a change of llmpipe's key itself)"


def compare(a: RunRecord, b: RunRecord) -> str:
    """The two runs side by side: config differences, cache keys, outputs, metrics, and the first
    stage that differs with what made it differ."""
    config_diff = config_differences(a.config, b.config)
    lines = [f"A: {a.run_id} ({a.name})", f"B: {b.run_id} ({b.name})", ""]
    if config_diff:
        lines.append(f"config differences ({len(config_diff)}):")
        width = max(len(k) for k in config_diff)
        lines += [f"  {k:<{width}}  {json.dumps(va)} -> {json.dumps(vb)}" for k, (va, vb) in config_diff.items()]
    else:
        lines.append("config: the same")
    names = [n for n in stage_names() if n in a.stages or n in b.stages]
    width = max(len(n) for n in names)
    lines += ["", f"{'stage':<{width}}  {'cache key':<9}  {'outputs':<7}  metrics (A -> B)"]
    first, first_output = None, None
    for name in names:
        sa, sb = a.stages.get(name), b.stages.get(name)
        if sa is None or sb is None:
            lines.append(f"{name:<{width}}  only in {'B' if sa is None else 'A'}")
            continue
        same_key = sa.manifest.get("cache_key") == sb.manifest.get("cache_key")
        same_outputs = not differing_files(comparable_files(name, sa.manifest), comparable_files(name, sb.manifest))
        if not same_key and first is None:
            first = name
        if not same_outputs and first_output is None:
            first_output = name
        shown = [f"{key} {_number(sa.metrics.get(key))} -> {_number(sb.metrics.get(key))}"
                 for key in (*STAGES[name].summary, "wall_time_s") if key in sa.metrics or key in sb.metrics]
        lines.append(f"{name:<{width}}  {'same' if same_key else 'differs':<9}  {'same' if same_outputs else 'differ':<7}  "
                     f"{'; '.join(shown)}")
    lines.append("")
    if first is None:
        lines.append("every stage both runs have shares its cache key")
    else:
        lines.append(f"first stage that differs: {first}, because of "
                     f"{why_different(first, a.stages[first], b.stages[first], config_diff)}")
    if first_output is not None and a.stages[first_output].manifest.get("cache_key") == b.stages[first_output].manifest.get("cache_key"):
        lines.append(f"first stage with other outputs: {first_output}, under the same cache key: its outputs depend on "
                     "something its config, inputs and code do not cover (it is not deterministic)")
    elif first_output is not None and first_output != first:
        lines.append(f"first stage with other outputs: {first_output}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


# --- each scheduled run against the last one and the champion ----------------------------------

PREVIOUS_RUN_TAG = "llmpipe.previous_run_id"  # on a flow's parent run: the last finished run on its run directory


def previous_run(client, experiment_id: str, run_dir: str, run_id: str) -> str | None:
    """The last finished flow run on `run_dir` other than `run_id` (stage runs carry no run_dir tag)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`llmpipe.run_dir` = '{run_dir}' "
                              "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=10)
    return next((run.info.run_id for run in runs if run.info.run_id != run_id), None)


def champion_metrics(client, model_name: str, version: int) -> tuple[str | None, dict[str, float]]:
    """The flow run whose eval registered `model_name` v`version`, and the report metrics it published."""
    model_version = client.get_model_version(model_name, str(version))
    if not model_version.run_id:
        return None, {}
    parent = client.get_run(model_version.run_id).data.tags.get("mlflow.parentRunId", model_version.run_id)
    return parent, client.get_run(parent).data.metrics


def metric_changes(current: dict[str, float], against: dict[str, tuple[str, dict[str, float]]]) -> str:
    """A markdown table: every report metric of this run, and its change against each named other run."""
    names = list(against)
    header = "| metric | this run | " + " | ".join(f"{name} | change" for name in names) + " |"
    lines = ["## Against earlier runs", "", *(f"- {name}: {label}" for name, (label, _) in against.items()), "",
             header, "|" + "---|" * (2 + 2 * len(names))]
    for metric in sorted(current):
        cells = [metric, _number(current[metric])]
        for _, other in against.values():
            before = other.get(metric)
            cells += [_number(before), "-" if before is None else f"{current[metric] - before:+.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
