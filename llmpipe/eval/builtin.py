"""The built-in multiple-choice tasks, made offline from the instruct stage's files and written as
lm-evaluation-harness task folders (so `lm_eval` runs them too):

  stdlib_objects   which standard-library object a documented summary belongs to (4 choices:
                   the object and three others documented in the same split)
  instruct_choice  the held-out verifiable questions (arithmetic, reversing, counting, ...), their
                   checked answer among up to three answers to other questions of the same kind

Test docs come from the held-out split, few-shot examples from the training split: the same
questions SFT never trained on are the ones scored.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

from llmpipe.alignment.data import PreferencePair, Prompt, RowCounts, load_preferences, load_prompts
from llmpipe.eval.tasks import write_task

CHOICES = 4
FEWSHOT = 2
_DOC_QUESTION = re.compile(r"^What (?:does|is the) `([^`]+)`(?: module)? (?:do|for)\?$")


def _with_distractors(rng: random.Random, right: str, others: list[str]) -> tuple[list[str], int] | None:
    """`right` among up to CHOICES - 1 distinct other answers, in a seeded order; None without one."""
    pool = sorted(set(others) - {right})
    if not pool:
        return None
    choices = [right, *rng.sample(pool, min(CHOICES - 1, len(pool)))]
    rng.shuffle(choices)
    return choices, choices.index(right)


def stdlib_object_docs(pairs: list[PreferencePair], seed: int) -> list[dict]:
    """{"summary", "choices", "label"} for each preference pair that asks what a documented object does."""
    named = []
    for pair in pairs:
        match = _DOC_QUESTION.match(pair.prompt[-1]["content"]) if pair.prompt else None
        if match and pair.chosen:
            named.append((match.group(1), pair.chosen[-1]["content"]))
    names = [name for name, _ in named]
    rng = random.Random(seed)
    docs = []
    for name, summary in named:
        made = _with_distractors(rng, name, names)
        if made:
            docs.append({"summary": summary, "choices": made[0], "label": made[1]})
    return docs


def instruct_choice_docs(prompts: list[Prompt], seed: int) -> list[dict]:
    """{"question", "task", "choices", "label"} for each verifiable prompt: other answers of its task as distractors."""
    by_task = defaultdict(list)
    for p in prompts:
        if p.task and p.answer is not None:
            by_task[p.task].append(str(p.answer))
    rng = random.Random(seed)
    docs = []
    for p in prompts:
        if p.task and p.answer is not None:
            made = _with_distractors(rng, str(p.answer), by_task[p.task])
            if made:
                docs.append({"question": p.prompt[-1]["content"], "task": p.task, "choices": made[0], "label": made[1]})
    return docs


def write_builtin_tasks(out: Path, names: list[str], instruct_dir: Path, seed: int) -> list[Path]:
    """The task folders `names` under `out`, from the instruct stage's folder; returns their YAMLs."""
    instruct_dir = Path(instruct_dir)

    def preferences(split: str) -> list[PreferencePair]:
        return load_preferences([instruct_dir / "preferences" / f"{split}.jsonl"], RowCounts(f"preferences/{split}"))

    def prompts(split: str) -> list[Prompt]:
        return load_prompts([instruct_dir / "prompts" / f"{split}.jsonl"], RowCounts(f"prompts/{split}"))

    made = {
        "stdlib_objects": lambda: (stdlib_object_docs(preferences("heldout"), seed),
                                   stdlib_object_docs(preferences("train"), seed), "Documentation: {{summary}}\nObject:"),
        "instruct_choice": lambda: (instruct_choice_docs(prompts("heldout"), seed),
                                    instruct_choice_docs(prompts("train"), seed), "Question: {{question}}\nAnswer:"),
    }
    paths = []
    for name in names:
        test, fewshot, template = made[name]()
        if len(test) and len(fewshot) >= FEWSHOT:  # e.g. no documentation questions (instruct.doc_examples: 0)
            paths.append(write_task(Path(out) / name, name, test, fewshot, doc_to_text=template, num_fewshot=FEWSHOT))
        else:
            print(f"eval: built-in task {name} left out: {len(test)} test docs, {len(fewshot)} few-shot docs")
    return paths
