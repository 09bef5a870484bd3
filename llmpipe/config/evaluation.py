"""Evaluation: what the `eval` stage measures of every model the run made, and the registry's rule."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from llmpipe.config.base import Section

BUILTIN_TASKS = ("stdlib_objects", "instruct_choice")  # made offline from the run's own held-out data
CHAMPION_METRICS = ("task_accuracy", "pref_accuracy", "rm_score")  # higher is better


def _existing_dirs(paths: list[Path]) -> list[Path]:
    missing = [str(p) for p in paths if not Path(p).is_dir()]
    if missing:
        raise ValueError(f"not a folder: {', '.join(missing)}")
    return paths


class EvalSection(Section):
    """Owned by llmpipe/eval/evaluate.py. Tasks are lm-evaluation-harness task folders (YAML + JSONL)."""

    execution_fields: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})

    builtin_tasks: list[Literal[BUILTIN_TASKS]] = list(BUILTIN_TASKS)
    task_dirs: Annotated[list[Path], AfterValidator(_existing_dirs)] = []  # more folders of task YAMLs
    num_fewshot: int | None = Field(None, ge=0)  # overrides every task's own num_fewshot; None: the task's
    fewshot_seed: int = 1234  # lm-evaluation-harness's default fewshot_random_seed
    limit: int | None = Field(None, ge=1)  # the first N items of each task; None: all
    max_heldout_tokens: int | None = Field(None, ge=1)  # of the held-out shards for loss and bits per byte; None: all
    eval_prompts: int = Field(200, ge=0)  # held-out verifiable prompts each chat model answers greedily
    max_new_tokens: int = Field(32, ge=1)
    examples: int = Field(3, ge=0)  # example answers per checkpoint in the report
    ngram: int = Field(13, ge=1)  # decontamination: n-grams of words shared with the training data
    champion_metric: Literal[CHAMPION_METRICS] = "task_accuracy"  # what the registry's champion must beat
    register_model: bool = True  # log the final chat model to the MLflow registry (when the run is tracked)
    batch_size: int = Field(32, ge=1)  # sequences per forward
    device: Literal["auto", "cpu", "cuda"] = "auto"
