"""The `eval` stage: every model the run made, measured the same way, and one report card.

    python -m llmpipe.eval.evaluate --config configs/tiny.yaml [--set 'eval.task_dirs=["DIR"]']

For each language model (pretrain, sft, dpo, ppo: those in the graph):
  * intrinsic: loss, perplexity and bits per byte on the held-out shards (`intrinsic`);
  * multiple-choice tasks scored by log-likelihood as lm-evaluation-harness scores them: the
    built-in tasks (written to eval/tasks/ as lm-eval task folders) and every task YAML under
    `eval.task_dirs`;
  * generative checks: greedy answers to the held-out verifiable prompts (`task_accuracy` by the
    checker), the reward model's mean score of them (`rm_score`), held-out `pref_accuracy`
    (chosen more likely than rejected), a few example answers.
The reward model: held-out pairwise accuracy. Every eval set is checked for n-gram overlap with the
training data (pretraining documents, SFT and preference data); task scores come with and without
the flagged items. Then the report (`report`), and the best chat model to the MLflow registry.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from llmpipe import io
from llmpipe.alignment.answers import greedy_responses, model_scores, reply_text
from llmpipe.alignment.checker import check
from llmpipe.alignment.data import RowCounts, load_preferences, load_prompts
from llmpipe.alignment.dpo_reference import pair_logps, pref_accuracy
from llmpipe.alignment.render import ChatEncoder, encode_pairs
from llmpipe.alignment.reward import pair_scores, pairwise_accuracy
from llmpipe.config import EvalSection
from llmpipe.context import StageContext, as_paths
from llmpipe.data.shards import load_split
from llmpipe.eval import decontaminate, report
from llmpipe.eval.builtin import write_builtin_tasks
from llmpipe.eval.intrinsic import heldout_metrics, token_byte_lengths, unigram_bpb
from llmpipe.eval.multiple_choice import chance, score_items, task_metrics
from llmpipe.eval.tasks import Task, find_tasks
from llmpipe.model.release import load_release
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.training.trainer import resolve_device

CHAT_MODELS = ("sft", "dpo", "ppo")


def _first_tokens(streams: list[np.ndarray], limit: int | None) -> list[np.ndarray]:
    if limit is None:
        return streams
    kept, left = [], limit
    for stream in streams:
        if left <= 0:
            break
        kept.append(stream[:left])
        left -= len(kept[-1])
    return kept


def training_index(documents: Path, instruct: Path, n: int) -> tuple[decontaminate.TrainingIndex, dict]:
    """The n-grams of the pretraining documents and of the instruct stage's training files."""
    index = decontaminate.TrainingIndex.from_documents(documents, n=n)
    files = sorted(Path(instruct).glob("*/train.jsonl"))
    for path in files:
        index.add_jsonl_texts(path, name=f"{path.parent.name}/{path.name}")
    return index, {"documents": str(Path(documents).name), "chat_files": [f"{p.parent.name}/{p.name}" for p in files]}


def _task_item_texts(task: Task, items) -> list[tuple[str, str]]:
    """What of a test doc could have been trained on: its text and its gold answer (no few-shot context)."""
    return [(str(i.doc_id), f"{task.field(i.doc, 'doc_to_text')} {i.choices[i.gold]}") for i in items]


def _message_text(messages: list[dict]) -> str:
    return " ".join(m["content"] for m in messages if isinstance(m.get("content"), str))


class Evaluator:
    """What every model is evaluated on, loaded once; `checkpoint(model)` measures one model."""

    def __init__(self, ctx: StageContext, cfg: EvalSection, device: torch.device):
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
        self.encoder = ChatEncoder(self.tokenizer)
        self.byte_lengths = token_byte_lengths(self.tokenizer)
        self.heldout = _first_tokens(load_split(ctx.inputs["shard"], "val"), cfg.max_heldout_tokens)
        instruct = Path(ctx.inputs["instruct"])
        tasks_dir = ctx.out_dir / "tasks"
        write_builtin_tasks(tasks_dir, cfg.builtin_tasks, instruct, ctx.seed)
        self.tasks = find_tasks([tasks_dir, *as_paths(ctx.inputs["task_dirs"])])
        self.items = {t.name: t.items(cfg.num_fewshot, cfg.fewshot_seed, cfg.limit) for t in self.tasks}
        counts = RowCounts("eval: held-out prompts")
        self.prompts = [p for p in load_prompts([instruct / "prompts" / "heldout.jsonl"], counts)
                        if p.task and p.answer is not None][:cfg.eval_prompts]
        pair_counts = RowCounts("eval: held-out preferences")
        self.preferences = load_preferences([instruct / "preferences" / "heldout.jsonl"], pair_counts)
        self.reward_model = load_release(ctx.inputs["reward"], device).eval() if "reward" in ctx.inputs else None
        self.index, self.training_sources = training_index(ctx.inputs["documents"], instruct, cfg.ngram)
        self.flags = self._contamination()

    def _contamination(self) -> dict[str, list[dict]]:
        sets = {task.name: _task_item_texts(task, self.items[task.name]) for task in self.tasks}
        sets["heldout_prompts"] = [(str(p.index), f"{_message_text(p.prompt)} {p.answer}") for p in self.prompts]
        sets["heldout_preferences"] = [(str(p.index), f"{_message_text(p.prompt)} {_message_text(p.chosen)}")
                                       for p in self.preferences]
        return {name: decontaminate.flag(items, self.index) for name, items in sets.items()}

    def contamination(self) -> dict:
        return {"ngram": self.cfg.ngram, "training_data": self.training_sources,
                "sets": {name: decontaminate.summary(flags) for name, flags in self.flags.items()}}

    def flagged(self, name: str) -> set[int]:
        return {int(f["id"]) for f in self.flags[name] if f["contaminated"]}

    @torch.no_grad()
    def checkpoint(self, model) -> dict:
        cfg, batch = self.cfg, self.cfg.batch_size
        intrinsic = heldout_metrics(model, self.heldout, model.cfg.seq_len, self.byte_lengths, batch)
        result = {"val_loss": intrinsic["loss"], "val_bpb": intrinsic["bpb"], "val_perplexity": intrinsic["perplexity"],
                  "val_tokens": intrinsic["tokens"], "val_bytes": intrinsic["bytes"]}
        prompt_ids = [self.encoder.prompt(p.prompt) for p in self.prompts]
        responses = greedy_responses(model, self.encoder, prompt_ids, cfg.max_new_tokens, batch)
        replies = [reply_text(self.encoder, r) for r in responses]
        right = [check(p.task, reply, p.answer) for p, reply in zip(self.prompts, replies)]
        result["task_accuracy"] = sum(right) / len(right) if right else math.nan
        scores = model_scores(self.reward_model, list(zip(prompt_ids, responses)), batch) if self.reward_model else None
        if scores is not None:
            result["rm_score"] = sum(scores) / len(scores) if scores else math.nan
        pairs = encode_pairs(self.encoder, self.preferences, model.cfg.seq_len, RowCounts("eval: preference pairs"))
        result["pref_accuracy"] = pref_accuracy(pair_logps(model, pairs, batch, "held-out pairs"))
        result["tasks"] = {task.name: task_metrics(score_items(model, self.tokenizer, self.items[task.name], batch),
                                                   self.flagged(task.name)) for task in self.tasks}
        result["examples"] = [
            {"prompt": p.prompt[-1]["content"], "reply": reply, "expected": p.answer, "correct": ok,
             **({"rm_score": scores[i]} if scores is not None else {})}
            for i, (p, reply, ok) in enumerate(list(zip(self.prompts, replies, right))[:cfg.examples])]
        return result

    def reward(self) -> dict:
        pairs = encode_pairs(self.encoder, self.preferences, self.reward_model.cfg.seq_len,
                             RowCounts("eval: preference pairs"))
        chosen, rejected = pair_scores(self.reward_model, pairs, self.cfg.batch_size, "reward model")
        return {"pairwise_accuracy": pairwise_accuracy(chosen, rejected), "n": len(pairs)}


def champion_candidate(checkpoints: dict, metric: str) -> str | None:
    """The run's best chat model by `metric`, or None without one. On a tie the earlier stage: more
    optimisation that did not move the metric is no reason to ship (PPO against a small reward
    model can tie SFT's accuracy while it learns to answer with nothing)."""
    scored = [(value, -i, name) for i, name in enumerate(CHAT_MODELS)
              if name in checkpoints and not math.isnan(value := checkpoints[name].get(metric, math.nan))]
    return max(scored)[2] if scored else None


def register(ctx: StageContext, cfg: EvalSection, checkpoints: dict) -> dict:
    """The best chat model logged to this stage's MLflow run as a pyfunc model, registered as
    `llmpipe-<run.name>`, and made `@champion` when it beats the current one on `eval.champion_metric`."""
    name = champion_candidate(checkpoints, cfg.champion_metric)
    if not cfg.register_model:
        return {"registered": False, "reason": "eval.register_model is false"}
    if name is None:
        return {"registered": False, "reason": f"no chat model with a {cfg.champion_metric}"}
    if ctx.tracker.uri is None or ctx.tracker.run_id is None:
        return {"registered": False, "reason": "the run is not tracked (no MLflow run for this stage)"}
    from llmpipe.eval import registry

    model_uri = registry.log_chat_model(ctx.tracker.uri, ctx.tracker.run_id, ctx.inputs[name], ctx.inputs["tokenizer"])
    value = checkpoints[name][cfg.champion_metric]
    outcome = registry.register_champion(ctx.tracker.uri, f"llmpipe-{ctx.run_name or ctx.run_dir.root.name}",
                                         model_uri, cfg.champion_metric, value)
    return {"registered": True, "checkpoint": name, **outcome}


def eval_stage(ctx: StageContext, cfg: EvalSection) -> dict:
    device = resolve_device(cfg.device, "eval")
    torch.manual_seed(ctx.seed)
    evaluator = Evaluator(ctx, cfg, device)
    checkpoints = {}
    for name in report.CHECKPOINTS:
        if name in ctx.inputs:
            print(f"evaluating {name}", flush=True)
            checkpoints[name] = evaluator.checkpoint(load_release(ctx.inputs[name], device).eval())
    if evaluator.reward_model is not None:
        checkpoints["reward"] = evaluator.reward()
    train = load_split(ctx.inputs["shard"], "train")
    stage_dirs = {name: Path(path) for name, path in ctx.inputs.items()  # the inputs that are whole stage folders
                  if not isinstance(path, list) and (Path(path) / "manifest.json").is_file()}
    card = {
        "checkpoints": checkpoints,
        "baselines": {"unigram_bpb": unigram_bpb(train, evaluator.heldout, evaluator.byte_lengths),
                      "chance": {name: chance(items) for name, items in evaluator.items.items()}},
        "funnel": report.funnel(stage_dirs),
        "contamination": evaluator.contamination(),
        "stages": report.stage_table(stage_dirs),
    }
    curves = {name: c for name in report.TRAINING_STAGES if name in stage_dirs
              and (c := report.training_curves(stage_dirs[name])) is not None}
    plots = report.plot_curves(curves, ctx.out_dir / "plots")
    card["registry"] = register(ctx, cfg, checkpoints)
    io.write_json(ctx.out_dir / "report.json", card)
    io.write_text(ctx.out_dir / "report.md",
                  report.render_markdown(card, [str(p.relative_to(ctx.out_dir)) for p in plots]))
    for path in [ctx.out_dir / "report.json", ctx.out_dir / "report.md", *plots]:
        ctx.tracker.log_artifact(path, "report" if path.suffix != ".png" else "report/plots")
    summary = {f"{name}.{key}": value for name, entry in checkpoints.items() for key, value in entry.items()
               if isinstance(value, (int, float))}
    summary.update({f"{name}.{task}.acc": m["acc"] for name, entry in checkpoints.items()
                    for task, m in entry.get("tasks", {}).items()})
    # the registry's state is not an outcome of the inputs: the report and MLflow say it, not the manifest
    return {**summary, "unigram_bpb": card["baselines"]["unigram_bpb"], "tasks": len(evaluator.tasks)}


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("eval")
