"""The report card: `eval/report.json` (machine-readable), `eval/report.md` and the training curves.

    {"checkpoints": {"pretrain"|"sft"|"dpo"|"ppo": {"val_loss", "val_bpb", "task_accuracy",
                     "pref_accuracy", "rm_score", "tasks": {task: {"acc", "acc_norm", "stderr", "n",
                     "n_contaminated", ...}}, "examples": [...]}, "reward": {"pairwise_accuracy", "n"}},
     "baselines": {"unigram_bpb", "chance": {task: acc}}, "funnel": {...}, "contamination": {...},
     "stages": {stage: {"wall_s", "config_hash", "code_version"}}, "registry": {...}}

A checkpoint that is not in the graph is absent, as is a metric that needs a model the run did not
make (rm_score without a reward model). `stages.*.wall_s` is each stage's last wall time and
`registry` what the MLflow registry held when this report was made: the two parts of the report
that are about this run rather than its inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmpipe import io
from llmpipe.training import checkpoint

CHECKPOINTS = ("pretrain", "sft", "dpo", "ppo")  # the language models, in pipeline order
PIPELINE = ("crawl", "prepare", "tokenizer", "shard", "pretrain", "instruct", "sft", "dpo_reference", "dpo", "reward",
            "ppo")  # the order of the stage table (a stage unknown here goes last)
TRAINING_STAGES = ("pretrain", "sft", "dpo", "reward", "ppo")
METRICS = (("val_loss", "val loss"), ("val_bpb", "val bpb"), ("task_accuracy", "task acc"),
           ("pref_accuracy", "pref acc"), ("rm_score", "rm score"))


# --- what the other stages left ------------------------------------------------------------------


def _manifest(stage_dir: Path) -> dict | None:
    return io.read_manifest(stage_dir) if (Path(stage_dir) / io.MANIFEST).is_file() else None


def stage_table(stage_dirs: dict[str, Path]) -> dict:
    """{stage: {wall_s, config_hash, code_version}} of every completed stage folder given."""
    table = {}
    rank = {name: i for i, name in enumerate(PIPELINE)}
    for name, folder in sorted(stage_dirs.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])):
        manifest = _manifest(folder)
        if manifest is None:
            continue
        timing = Path(folder) / ".timing.json"
        wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        table[name] = {"wall_s": wall, "config_hash": manifest.get("config_hash"), "code_version": manifest.get("code_version")}
    return table


def funnel(stage_dirs: dict[str, Path]) -> dict:
    """Pages crawled (with `crawl.refresh`: new, changed, unchanged, removed), documents after extraction, each
    filter and dedup step, then tokens: from the manifests."""
    counts = {name: (_manifest(folder) or {}).get("counts", {}) for name, folder in stage_dirs.items()}
    crawl, prepare, shard = counts.get("crawl", {}), counts.get("prepare", {}), counts.get("shard", {})
    steps: dict[str, float] = {}
    if "pages_fetched" in crawl:
        steps["pages_crawled"] = crawl["pages_fetched"]
    for change in ("new", "changed", "unchanged", "removed"):  # a refresh's pages against the crawl before it
        if f"refresh.{change}" in crawl:
            steps[f"pages_{change}"] = crawl[f"refresh.{change}"]
    if "pages_in" in prepare:
        steps["pages_extracted"] = prepare["pages_in"]
    for key in sorted((k for k in prepare if k.startswith("kept_after.")), key=lambda k: prepare[k], reverse=True):
        steps[f"after_{key.removeprefix('kept_after.')}"] = prepare[key]
    if "documents" in prepare:
        steps["documents"] = prepare["documents"]
    for key in ("train_tokens", "val_tokens", "val_bytes"):
        if key in shard:
            steps[key] = shard[key]
    return steps


def training_curves(stage_dir: Path) -> dict | None:
    """{"train": [[step, loss], ...], "val": [...]} from the stage's newest checkpoint, or None."""
    newest = checkpoint.newest(Path(stage_dir) / "checkpoints")
    if newest is None:
        return None
    state = json.loads((newest / "state.json").read_text())
    return {"train": state.get("train_history", []), "val": state.get("history", [])}


def plot_curves(curves: dict[str, dict], out_dir: Path) -> list[Path]:
    """One PNG per training stage: training and held-out loss by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for stage, curve in curves.items():
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        for label, points in (("train", curve["train"]), ("held-out", curve["val"])):
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if label != "train" else None,
                        markersize=3, label=label)
        ax.set(title=f"{stage} loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(out_dir) / f"{stage}.png"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})  # no version string: same bytes
        plt.close(fig)
        paths.append(path)
    return paths


# --- rendering -----------------------------------------------------------------------------------


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def checkpoint_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The checkpoints-by-metrics table (header, rows), baselines last: for the markdown and the terminal."""
    tasks = sorted({t for c in CHECKPOINTS for t in report["checkpoints"].get(c, {}).get("tasks", {})})
    header = ["model", *[label for _, label in METRICS], *tasks]
    rows = []
    for name in CHECKPOINTS:
        entry = report["checkpoints"].get(name)
        if entry is not None:
            rows.append([name, *[_number(entry.get(key)) for key, _ in METRICS],
                         *[_number(entry.get("tasks", {}).get(t, {}).get("acc")) for t in tasks]])
    baselines = report["baselines"]
    rows.append(["unigram", "-", _number(baselines.get("unigram_bpb")), "-", "-", "-", *["-" for _ in tasks]])
    rows.append(["chance", "-", "-", "-", "-", "-", *[_number(baselines.get("chance", {}).get(t)) for t in tasks]])
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(report: dict, plots: list[str]) -> str:
    out = ["# Run report", "", "## Models", "", _markdown_table(*checkpoint_rows(report)), "",
           "Task columns are lm-eval `acc`; bits per byte on the held-out shards (special tokens excluded)."]
    reward = report["checkpoints"].get("reward")
    if reward:
        out += ["", f"Reward model: held-out pairwise accuracy {_number(reward['pairwise_accuracy'])} "
                    f"on {reward['n']:,} pairs."]
    task_names = sorted({t for c in CHECKPOINTS for t in report["checkpoints"].get(c, {}).get("tasks", {})})
    if task_names:
        out += ["", "## Multiple-choice tasks", "",
                "| model | task | acc | acc_norm | stderr | n | contaminated | acc without them |", "|---|---|---|---|---|---|---|---|"]
        for name in CHECKPOINTS:
            for task, m in sorted(report["checkpoints"].get(name, {}).get("tasks", {}).items()):
                out.append(f"| {name} | {task} | {_number(m['acc'])} | {_number(m['acc_norm'])} | "
                           f"{_number(m['stderr'])} | {m['n']} | {m['n_contaminated']} | {_number(m['acc_clean'])} |")
    examples = [(name, e) for name in CHECKPOINTS for e in report["checkpoints"].get(name, {}).get("examples", [])]
    if examples:
        out += ["", "## Example answers (greedy, held-out prompts)", "", "| model | prompt | reply | expected | correct |",
                "|---|---|---|---|---|"]
        for name, e in examples:
            cells = [_cell(e["prompt"]), _cell(e["reply"]), _cell(e["expected"]), "yes" if e["correct"] else "no"]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "## Data funnel", "", "| step | count |", "|---|---|"]
    out += [f"| {step} | {_number(n)} |" for step, n in report["funnel"].items()]
    contamination = report["contamination"]
    out += ["", f"## Contamination ({contamination['ngram']}-grams shared with the training data)", "",
            "| eval set | items | flagged | first flagged: source |", "|---|---|---|---|"]
    for name, entry in contamination["sets"].items():
        first = entry["examples"][0] if entry["examples"] else None
        shown = _cell(f"{first['id']}: {first['source']}") if first else "-"
        out.append(f"| {name} | {entry['n']} | {entry['n_contaminated']} | {shown} |")
    if plots:
        out += ["", "## Training curves", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    out += ["", "## Stages", "", "| stage | wall s | config hash | code version |", "|---|---|---|---|"]
    out += [f"| {name} | {_number(s['wall_s'])} | `{(s['config_hash'] or '-')[:12]}` | `{(s['code_version'] or '-')[:12]}` |"
            for name, s in report["stages"].items()]
    registry = report.get("registry")
    if registry:
        out += ["", "## Model registry", "", registry_line(registry)]
    return "\n".join(out) + "\n"


def registry_line(registry: dict) -> str:
    if not registry.get("registered"):
        return f"not registered: {registry['reason']}"
    return (f"`{registry['model_name']}` version {registry['version']} ({registry['checkpoint']}) registered; "
            f"`@champion` is version {registry['champion_version']}: {registry['reason']}")


def _cell(text) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 60 else text[:57] + "..."


def terminal_table(report: dict) -> str:
    """About a dozen lines for the end of `llmpipe run`: the models table, the reward model, the registry."""
    header, rows = checkpoint_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    reward = report["checkpoints"].get("reward")
    if reward:
        lines.append(f"reward model: pairwise accuracy {_number(reward['pairwise_accuracy'])} on {reward['n']:,} pairs")
    if report.get("registry"):
        lines.append(registry_line(report["registry"]))
    return "\n".join(lines)
