"""Multiple-choice tasks in lm-evaluation-harness's own YAML format, read as lm-eval reads them.

    task: instruct_choice
    dataset_path: json
    dataset_kwargs: {data_files: {test: test.jsonl, train: train.jsonl}}
    test_split: test
    fewshot_split: train
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    target_delimiter: " "
    num_fewshot: 2
    metric_list: [{metric: acc}, {metric: acc_norm}]

The plain `multiple_choice` case: a field is a column name or a Jinja template (StrictUndefined,
trailing newlines kept); `doc_to_choice` renders to a Python list literal; `doc_to_target` to an
index or the text of a choice. Few-shot examples come from `fewshot_split` by lm-eval's sampler: one
`random.Random(fewshot_seed)` per task drawing `num_fewshot` docs for each test doc in order (n + 1,
minus the doc itself, when the few-shot split is the test split). The context is `description`,
then each example as text + target_delimiter + answer + fewshot_delimiter, then the doc's text.

`data_files` are relative to the YAML's folder here; lm-eval resolves them against its working
directory, so run `lm_eval --include_path .` from the task folder. Other keys lm-eval knows
(generation, filters, custom `!function`s) are refused by name rather than silently ignored.
"""

from __future__ import annotations

import ast
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import BaseLoader, Environment, StrictUndefined, TemplateError

from llmpipe.config import read_yaml, to_yaml
from llmpipe.errors import UserError

_JINJA = Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
SUPPORTED_METRICS = ("acc", "acc_norm")
# keys that change nothing for a plain multiple-choice task scored by log-likelihood
_IGNORED_KEYS = {"tag", "group", "metadata", "dataset_name", "training_split", "validation_split",
                 "should_decontaminate", "doc_to_decontamination_query", "repeats"}
_KEYS = {"task", "dataset_path", "dataset_kwargs", "test_split", "fewshot_split", "output_type", "doc_to_text",
         "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter", "num_fewshot", "metric_list",
         "description", "fewshot_config"} | _IGNORED_KEYS


class TaskError(UserError):
    """A task file that is not a plain lm-eval multiple-choice task, or a doc that does not render."""


@dataclass(frozen=True)
class Item:
    """One test doc as requests: the context, the choices (each scored as target_delimiter + choice), the gold index."""

    doc_id: int
    context: str
    choices: list[str]
    gold: int
    delimiter: str
    doc: dict


@dataclass
class Task:
    name: str
    path: Path  # the YAML
    config: dict
    test_docs: list[dict]
    fewshot_docs: list[dict]

    @property
    def num_fewshot(self) -> int:
        return int(self.config.get("num_fewshot") or 0)

    def field(self, doc: dict, key: str) -> Any:
        """lm-eval's resolution of doc_to_text / doc_to_choice / doc_to_target for one doc."""
        spec = self.config[key]
        if not isinstance(spec, str):
            return spec
        if spec in doc:
            return doc[spec]
        try:
            rendered = _JINJA.from_string(spec).render(**doc)
        except TemplateError as err:
            raise TaskError(f"{self.path}: {key} does not render for doc {doc}: {err}") from None
        if key == "doc_to_choice":
            try:
                return ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                raise TaskError(f"{self.path}: doc_to_choice rendered {rendered[:80]!r}, not a list") from None
        if key == "doc_to_target":
            if rendered.isdigit():
                return int(rendered)
            if len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
                try:
                    return ast.literal_eval(rendered)
                except (SyntaxError, ValueError):
                    return rendered
        return rendered

    def gold(self, doc: dict, choices: list[str]) -> int:
        target = self.field(doc, "doc_to_target")
        if isinstance(target, str):
            if target not in choices:
                raise TaskError(f"{self.path}: target {target!r} is not one of the choices {choices}")
            return choices.index(target)
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise TaskError(f"{self.path}: target {target!r} is not a choice index below {len(choices)}")
        return target

    def answer_text(self, doc: dict) -> str:
        choices = self.field(doc, "doc_to_choice")
        return choices[self.gold(doc, choices)]

    def items(self, num_fewshot: int | None = None, seed: int = 1234, limit: int | None = None) -> list[Item]:
        """The test docs as scored requests, in doc order, few-shot contexts drawn as lm-eval draws them."""
        n = self.num_fewshot if num_fewshot is None else num_fewshot
        delimiter = self.config.get("target_delimiter", " ")
        fewshot_delimiter = self.config.get("fewshot_delimiter", "\n\n")
        description = self.config.get("description", "") or ""
        same_split = self.config.get("fewshot_split") == self.config.get("test_split")
        pool = self.test_docs if same_split else self.fewshot_docs
        if n and len(pool) < n + same_split:
            raise TaskError(f"{self.path}: num_fewshot={n} but the few-shot split has {len(pool)} docs")
        rng = random.Random(seed)
        items = []
        for doc_id, doc in enumerate(self.test_docs[:limit]):
            shots = []
            if n:
                drawn = rng.sample(pool, n + 1) if same_split else rng.sample(pool, n)
                shots = [d for d in drawn if d != doc][:n] if same_split else drawn
            context = description + fewshot_delimiter if description else ""
            for shot in shots:
                context += self.field(shot, "doc_to_text") + delimiter + self.answer_text(shot) + fewshot_delimiter
            context += self.field(doc, "doc_to_text")
            choices = self.field(doc, "doc_to_choice")
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
                raise TaskError(f"{self.path}: doc {doc_id}: doc_to_choice must give a list of 2 or more strings")
            items.append(Item(doc_id, context, choices, self.gold(doc, choices), delimiter, doc))
        return items


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"{path}: no such data file")
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError:
                raise TaskError(f"{path}:{number}: not valid JSON") from None
    return docs


def _split_files(config: dict, folder: Path, split: str, path: Path) -> list[Path]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, list)):
        files = {"train": files}  # what datasets names a lone data_files
    if not isinstance(files, dict) or split not in files:
        raise TaskError(f"{path}: dataset_kwargs.data_files has no {split!r} split")
    names = files[split] if isinstance(files[split], list) else [files[split]]
    return [folder / name for name in names]


def load_task(path: Path) -> Task:
    path = Path(path)
    config = read_yaml(path)
    if not isinstance(config, dict) or "task" not in config:
        raise TaskError(f"{path}: not a task (no `task` key)")
    unknown = sorted(set(config) - _KEYS)
    if unknown:
        raise TaskError(f"{path}: key {unknown[0]} is not supported; supported keys: {', '.join(sorted(_KEYS))}")
    if config.get("output_type", "multiple_choice") != "multiple_choice":
        raise TaskError(f"{path}: output_type={config['output_type']!r}: allowed values: multiple_choice")
    if config.get("dataset_path") != "json":
        raise TaskError(f"{path}: dataset_path={config.get('dataset_path')!r}: allowed values: json (local JSONL files)")
    for key in ("test_split", "doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in config:
            raise TaskError(f"{path}: {key} is missing")
    metrics = [m.get("metric") if isinstance(m, dict) else m for m in config.get("metric_list") or []]
    bad = [m for m in metrics if m not in SUPPORTED_METRICS]
    if bad:
        raise TaskError(f"{path}: metric {bad[0]!r}: allowed values: {', '.join(SUPPORTED_METRICS)}")
    sampler = (config.get("fewshot_config") or {}).get("sampler", "default")
    if sampler != "default":
        raise TaskError(f"{path}: fewshot_config.sampler={sampler!r}: allowed values: default")
    folder = path.parent
    test = [doc for f in _split_files(config, folder, config["test_split"], path) for doc in _read_jsonl(f)]
    fewshot_split = config.get("fewshot_split")
    fewshot = ([doc for f in _split_files(config, folder, fewshot_split, path) for doc in _read_jsonl(f)]
               if fewshot_split else [])
    return Task(str(config["task"]), path, config, test, fewshot)


def find_tasks(folders: list[Path]) -> list[Task]:
    """Every task YAML below the folders, in sorted path order; two tasks with one name are an error."""
    tasks: dict[str, Task] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            task = load_task(path)
            if task.name in tasks:
                raise TaskError(f"task {task.name!r} is defined twice: {tasks[task.name].path} and {path}")
            tasks[task.name] = task
    return list(tasks.values())


def write_task(folder: Path, name: str, test: list[dict], fewshot: list[dict], *, doc_to_text: str,
               num_fewshot: int, description: str = "") -> Path:
    """A task folder lm-eval and `load_task` both read: <name>.yaml, test.jsonl, train.jsonl.
    Docs carry `choices` (a list) and `label` (the gold index)."""
    from llmpipe import io

    folder = Path(folder)
    config = {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "test.jsonl", "train": "train.jsonl"}},
        "test_split": "test", "fewshot_split": "train", "output_type": "multiple_choice",
        **({"description": description} if description else {}),
        "doc_to_text": doc_to_text, "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "target_delimiter": " ", "num_fewshot": num_fewshot,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in SUPPORTED_METRICS],
    }
    for split, docs in (("test", test), ("train", fewshot)):
        io.write_text(folder / f"{split}.jsonl", "".join(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n"
                                                         for d in docs))
    io.write_text(folder / f"{name}.yaml", to_yaml(config))
    return folder / f"{name}.yaml"
