"""The `instruct` stage: the default post-training data, made offline from real sources.

    python -m llmpipe.alignment.instruct --config configs/tiny.yaml

Two sources, nothing written by hand and nothing downloaded:
  * the installed standard library's documentation (`_stdlib_docs.py`, read with `inspect` in a
    `python -I -S` subprocess): "What does `textwrap.dedent` do?" -> its docstring's summary;
    "What is the signature of `json.dumps`?"; "What is the `csv` module for?";
  * verifiable tasks (`checker.py`): arithmetic and string manipulation, answered by the checker.

Writes `sft/{train,heldout}.jsonl` (`messages`), `preferences/{train,heldout}.jsonl`
(conversational prompt/chosen/rejected: the right answer over a plausible wrong one: another
object's summary, an off-by-one result, a wrongly reversed word) and `prompts/{train,heldout}.jsonl`
(prompt, task, answer; the verifiable tasks). A question is held out by a hash of its text, so
none is in both splits. The same config and Python version give the same bytes; the Python
version is part of the stage's cache key (the documentation is the installed library's).
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from llmpipe import io
from llmpipe.alignment.checker import Question, make_question
from llmpipe.config import InstructSection
from llmpipe.context import StageContext
from llmpipe.errors import UserError

DOCS_SCRIPT = Path(__file__).with_name("_stdlib_docs.py")
KINDS = ("sft", "preferences", "prompts")


def stdlib_records(modules: list[str]) -> list[dict]:
    """The documentation records of the standard library (`_stdlib_docs.py`), in its order."""
    done = subprocess.run([sys.executable, "-I", "-S", str(DOCS_SCRIPT), *modules], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise UserError(f"reading the standard library's documentation failed: {done.stderr.strip()[-300:]}")
    return [json.loads(line) for line in done.stdout.splitlines()]


def doc_questions(records: list[dict], n: int, rng: random.Random) -> list[Question]:
    """Up to `n` questions about documented objects; the wrong answer is another object's summary."""
    summaries = [r for r in records if r["summary"]]
    candidates = []
    for record in summaries:
        qualified = f"{record['module']}.{record['name']}" if record["name"] else record["module"]
        if record["kind"] == "module":
            candidates.append(("doc", f"What is the `{qualified}` module for?", record["summary"]))
        else:
            candidates.append(("doc", f"What does `{qualified}` do?", record["summary"]))
            if record["signature"] and len(record["signature"]) <= 80:
                candidates.append(("signature", f"What is the signature of `{qualified}`?",
                                   f"{qualified}{record['signature']}"))
    rng.shuffle(candidates)
    answers = [c[2] for c in candidates]
    questions = []
    for kind, question, answer in candidates[:n]:
        wrong = answer
        while wrong == answer:
            wrong = rng.choice(answers)
        questions.append(Question(kind, question, answer, wrong))
    return questions


def task_questions(cfg: InstructSection, rng: random.Random) -> list[Question]:
    """`cfg.task_examples` distinct verifiable questions, the tasks taking turns."""
    questions, seen = [], set()
    attempts = 0
    while len(questions) < cfg.task_examples and attempts < 50 * max(1, cfg.task_examples):
        task = cfg.tasks[attempts % len(cfg.tasks)]
        attempts += 1
        q = make_question(task, rng, cfg.max_operand)
        if q.question not in seen:
            seen.add(q.question)
            questions.append(q)
    return questions


def is_heldout(question: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def rows(question: Question, verifiable: bool) -> dict[str, dict | None]:
    prompt = [{"role": "user", "content": question.question}]
    return {
        "sft": {"messages": prompt + [{"role": "assistant", "content": question.answer}]},
        "preferences": {"prompt": prompt, "chosen": [{"role": "assistant", "content": question.answer}],
                        "rejected": [{"role": "assistant", "content": question.wrong}]},
        "prompts": {"prompt": prompt, "task": question.task, "answer": question.answer} if verifiable else None,
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    io.write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records))


def instruct_stage(ctx: StageContext, cfg: InstructSection) -> dict:
    rng = random.Random(ctx.seed)
    docs = doc_questions(stdlib_records(cfg.modules), cfg.doc_examples, rng) if cfg.doc_examples else []
    tasks = task_questions(cfg, rng)
    seen, files = set(), {(kind, split): [] for kind in KINDS for split in ("train", "heldout")}
    per_source = Counter()
    for question, verifiable in [(q, False) for q in docs] + [(q, True) for q in tasks]:
        if question.question in seen:
            continue
        seen.add(question.question)
        split = "heldout" if is_heldout(question.question, ctx.seed, cfg.heldout_fraction) else "train"
        per_source[f"{question.task}_{split}"] += 1
        for kind, row in rows(question, verifiable).items():
            if row is not None:
                files[(kind, split)].append(row)
    counts = {}
    for (kind, split), records in files.items():
        rng.shuffle(records)  # documentation and tasks mixed
        write_jsonl(ctx.out_dir / kind / f"{split}.jsonl", records)
        counts[f"{kind}_{split}"] = len(records)
    return {**counts, "questions": dict(sorted(per_source.items())), "python_version": platform.python_version()}


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("instruct")
