"""Multiple-choice scoring: llmpipe's scorer against lm-evaluation-harness (`--model hf`) on the
same exported model and the same task folder.

    python benchmarks/eval_multiple_choice.py                  # tiny preset, random weights, a made-up task
    python benchmarks/eval_multiple_choice.py --run-dir runs/tiny --stage sft --task instruct_choice

With `--run-dir`, the stage's release weights are exported (`llmpipe.export.export_hf`) and the task
is the run's own `eval/tasks/<task>/` (what `make demo` wrote). Without it, configs/tiny.yaml's model
(randomly initialised: speed does not depend on the weights) and a synthetic 4-choice task of
`--items` docs with 2-shot contexts from a separate split.

Both sides get the model loaded before the clock starts; each timed run then reads the task
folder, builds the few-shot contexts and scores every choice: lm-eval's `simple_evaluate` on an
`HFLM` at `--batch-size`, ours `load_task` + `items` + `score_items` at the same batch size (in
contexts: each context's choices are scored from its one cached forward). Items/s is over the
fastest of `--repeats` runs. The log-likelihoods are compared per choice (max |difference|) and
acc / acc_norm per item.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is for that with as on by this be are from or it an at which not can "
         "function module return value class object file list string number default").split()


def synthetic_task(folder: Path, items: int) -> Path:
    from llmpipe.eval.tasks import write_task

    rng = random.Random(0)

    def docs(n):
        out = []
        for _ in range(n):
            choices = sorted({" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(4)})
            out.append({"question": " ".join(rng.choices(WORDS, k=rng.randint(8, 30))), "choices": choices,
                        "label": rng.randrange(len(choices))})
        return out

    return write_task(folder / "synthetic_mc", "synthetic_mc", docs(items), docs(64), num_fewshot=2,
                      doc_to_text="Question: {{question}}\nAnswer:")


def random_release(run_dir: Path) -> None:
    """configs/tiny.yaml's model, random weights, as a completed `pretrain` stage with the tiny tokenizer shape."""
    from llmpipe import config as configlib
    from llmpipe import io
    from llmpipe.model.model import Transformer
    from llmpipe.model.release import save_release

    cfg = configlib.load(ROOT / "configs" / "tiny.yaml").model
    torch.manual_seed(0)
    folder = run_dir / "pretrain"
    save_release(Transformer(cfg), folder)
    files = {p.name: {"sha256": io.sha256_file(p), "bytes": p.stat().st_size} for p in folder.iterdir()}
    io.write_json(folder / "manifest.json", {"stage": "pretrain", "files": files, "fingerprint": "random"})


def toy_tokenizer(folder: Path) -> None:
    """A byte-level BPE with our special tokens, trained on the task's words (vocab <= the model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmpipe.tokenizer.special import SPECIAL_TOKENS
    from llmpipe.tokenizer.train import save_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    save_tokenizer(tok, folder)


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run (its eval/tasks and a stage's weights)")
    parser.add_argument("--stage", default="sft")
    parser.add_argument("--task", default="instruct_choice")
    parser.add_argument("--items", type=int, default=200, help="synthetic task size (without --run-dir)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmpipe.eval.multiple_choice import score_items
    from llmpipe.eval.tasks import load_task
    from llmpipe.export import export_hf
    from llmpipe.model.release import load_release
    from llmpipe.paths import RunDir
    from llmpipe.tokenizer.train import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    if args.run_dir:
        run_dir, stage = RunDir(args.run_dir.resolve()), args.stage  # resolved: the benchmark changes directory
        yaml_path = run_dir.eval_dir / "tasks" / args.task / f"{args.task}.yaml"
    else:
        run_dir, stage = RunDir(work / "run"), "pretrain"
        random_release(run_dir.root)
        toy_tokenizer(run_dir.tokenizer_dir)
        yaml_path = synthetic_task(work, args.items)
    export = export_hf(run_dir.root, stage, work / "hf")
    task_dir, name = yaml_path.parent, load_task(yaml_path).name
    os.chdir(task_dir)  # lm-eval resolves data_files against its working directory
    os.environ.update(HF_DATASETS_CACHE=str(work / "hf-cache"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

    lm = HFLM(pretrained=str(export), dtype="float32", add_bos_token=True, batch_size=args.batch_size, device="cpu")
    # only our folder: indexing lm-eval's ~14,000 built-in task files takes longer than the scoring
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    def theirs():
        return simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True, verbosity="ERROR")

    model, tokenizer = load_release(run_dir.stage(stage)).eval(), load_tokenizer(run_dir.tokenizer_dir)

    def ours():
        return score_items(model, tokenizer, load_task(yaml_path).items(seed=1234), args.batch_size)

    theirs()  # warm-up: datasets' cache of the JSONL, first allocations
    ours()
    t_theirs, results = best(theirs, args.repeats)
    t_ours, scored = best(ours, args.repeats)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    diff = max(abs(r[0] - ll) for s, o in zip(samples, scored) for r, ll in zip(s["filtered_resps"], o.loglikelihoods))
    same = all((s["acc"], s["acc_norm"]) == (o.acc, o.acc_norm) for s, o in zip(samples, scored))
    n, choices = len(scored), sum(len(o.item.choices) for o in scored)
    print(f"task {name}: {n} items, {choices} choices, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print(f"{'scorer':<14} {'seconds':>8} {'items/s':>9} {'choices/s':>10}")
    for label, seconds in (("lm-eval hf", t_theirs), ("llmpipe", t_ours)):
        print(f"{label:<14} {seconds:8.2f} {n / seconds:9.1f} {choices / seconds:10.1f}")
    print(f"llmpipe/lm-eval: {t_theirs / t_ours:.2f}x items/s; max |loglikelihood difference| {diff:.2e}; "
          f"acc and acc_norm equal on every item: {same}")


if __name__ == "__main__":
    main()
