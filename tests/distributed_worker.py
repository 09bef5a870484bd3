"""Training variants of a tiny model, run by every rank of a torchrun job (or by one process in pytest).

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR SPECS_JSON

Each spec names a strategy, a micro-batch size and optionally a checkpoint to resume from (copied
from an earlier spec's output) and a step to stop after; "kind" is "train" (default), "pretrain"
(the stage's `run_pretrain` on OUT_DIR/shards; every rank writes its result dict to
OUT_DIR/<name>.rank<r>.json) or "guard" (a NaN loss on one rank only). For a train spec, rank 0 writes
OUT_DIR/<name>.pt with the per-step losses and the final full weights, and every rank writes
OUT_DIR/<name>.rank<r>.json with the rows it trained on per step (their sha1s), so the pytest
side compares all of it with one process on the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from model_fixtures import MODEL, PRETRAIN, synthetic_documents  # noqa: E402

from llmpipe.config import ModelSection, ParallelConfig, PretrainSection  # noqa: E402
from llmpipe.data.loader import TokenLoader  # noqa: E402
from llmpipe.distributed import env  # noqa: E402
from llmpipe.model.model import next_token_loss  # noqa: E402
from llmpipe.tracking import NullTracker  # noqa: E402
from llmpipe.training.pretrain import next_token_step, run_pretrain  # noqa: E402
from llmpipe.training.trainer import LoopState, Trainer, TrainingDiverged, TrainTask  # noqa: E402

SEQ_LEN = MODEL["seq_len"]
BATCH_TOKENS = 8 * SEQ_LEN  # 8 sequences per optimizer step, however they are split
SEED = 11


def token_stream() -> np.ndarray:
    docs = synthetic_documents(300, seed=3)
    return np.concatenate([np.concatenate([[0], d]) for d in docs]).astype(np.uint16)


class RecordingLoader(TokenLoader):
    """A TokenLoader that remembers a digest of every row it hands out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[str] = []

    def next_batch(self):
        x, y = super().next_batch()
        self.rows += [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x]
        return x, y


class GradNormTracker(NullTracker):
    """Keeps the global gradient norm the trainer logs at every step (log_every=1): it must count
    every shard and every pipeline stage, as one process does."""

    def __init__(self):
        self.grad_norms: dict[int, float] = {}

    def log_metrics(self, metrics, step=None):
        if "train/grad_norm" in metrics:
            self.grad_norms[step] = metrics["train/grad_norm"]


def model_config(spec: dict) -> ModelSection:
    return ModelSection(**{**MODEL, "tie_embeddings": spec.get("tie_embeddings", False),
                           "n_layers": spec.get("n_layers", MODEL["n_layers"])})


def init_path(out_dir: Path, spec: dict) -> Path | None:
    """Where the initial weights of the spec's model (tied or not, its depth) are; None for a spec
    "from_seed", which the trainer initialises from the seed."""
    if spec.get("from_seed"):
        return None
    layers = spec.get("n_layers", MODEL["n_layers"])
    return out_dir / f"init-tied{int(spec.get('tie_embeddings', False))}-layers{layers}.safetensors"


def train_config(spec: dict, world_size: int) -> PretrainSection:
    parallel = ParallelConfig(**{k: spec[k] for k in ("strategy", "tp", "pp", "pp_schedule", "pp_virtual_stages",
                                                                           "grad_sync")
                                 if k in spec})
    return PretrainSection(max_steps=spec.get("steps", 6), batch_tokens=BATCH_TOKENS,
                           micro_batch_size=spec.get("micro_batch_size", 2), lr=3e-3, warmup_steps=2,
                           eval_every=0, checkpoint_every=spec.get("checkpoint_every", 0), log_every=1,
                           spike_factor=0.0, peak_flops=1e11, nproc=world_size, parallel=parallel,
                           activation_checkpointing=spec.get("activation_checkpointing", False))


def run_variant(spec: dict, out_dir: Path, init_from: Path | None) -> dict:
    """Train one spec from the weights in `init_from`; return losses, rows per step and full weights (rank 0)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, model_cfg = train_config(spec, world_size), model_config(spec)
    trainer = Trainer(model_cfg, cfg, seed=SEED, init_from=init_from, loss_fn=next_token_loss)
    loader = RecordingLoader([token_stream()], SEQ_LEN, trainer.micro_batch_size, seed=SEED,
                             rank=trainer.dp_rank, world_size=trainer.dp_size)
    probe: dict = {}
    task = TrainTask("pretrain", probing(next_token_step, probe), loader, split_batch=lambda batch: batch)
    ckpt_root = out_dir / spec["name"] / "checkpoints"
    if "resume_from" in spec and env.is_main():
        shutil.copytree(out_dir / spec["resume_from"] / "checkpoints", ckpt_root)
    env.barrier()
    state = trainer.resume(ckpt_root, task)
    losses, rows = {}, {}

    def record(state) -> None:
        losses[state.step] = state.train_loss
        rows[state.step] = loader.rows
        loader.rows = []

    trainer.on_step_end.append(record)
    tracker = GradNormTracker()
    trainer.fit(task, state, ckpt_root=ckpt_root, config={}, tracker=tracker, stop_after=spec.get("stop_after"))
    return {"losses": losses, "rows": rows, "params": trainer.full_model_state(), "grad_norms": tracker.grad_norms,
            "dp_rank": trainer.dp_rank, "loader": loader.state_dict(), "probe": probe.get("grads")}


def probing(step_fn, probe: dict):
    """`step_fn`, noting the gradients it finds at its second call (with accumulation: after the
    first micro-batch's backward): None where there is none, else the sum of a plain tensor's."""
    calls = []

    def step(model, batch):
        calls.append(1)
        if len(calls) == 2:
            probe["grads"] = [None if p.grad is None else float(p.grad.sum()) if type(p.grad) is torch.Tensor
                              else "dtensor" for p in model.parameters()]
        return step_fn(model, batch)

    return step


def run_pretrain_stage(spec: dict, out_dir: Path) -> dict:
    """The pretrain stage's library function as the launch worker calls it (initial weights from
    the config and the seed): rank 0 writes the outputs."""
    cfg = PretrainSection(**{**PRETRAIN, **spec["pretrain"], "nproc": int(os.environ.get("WORLD_SIZE", "1")),
                             "parallel": ParallelConfig(strategy=spec["strategy"], **spec.get("parallel", {}))})
    return run_pretrain(model_config(spec), cfg, out_dir / "shards", out_dir / spec["name"], seed=SEED)


def run_guard(spec: dict, out_dir: Path, init_from: Path) -> dict:
    """Only the last rank sees a NaN loss at step 3 (its gradients stay finite): every rank must stop there."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = train_config(spec, world_size)
    trainer = Trainer(model_config(spec), cfg, seed=SEED, init_from=init_from)
    loader = TokenLoader([token_stream()], SEQ_LEN, trainer.micro_batch_size, seed=SEED, rank=trainer.dp_rank,
                         world_size=trainer.dp_size)
    calls = []

    def nan_on_last_rank(model, batch):
        calls.append(1)
        loss, metrics = next_token_step(model, batch)
        if len(calls) == 3 and env.rank() == world_size - 1:
            loss = loss + float("nan")
        return loss, metrics

    task = TrainTask("pretrain", nan_on_last_rank, loader)
    try:
        trainer.fit(task, LoopState(), ckpt_root=out_dir / spec["name"], config={})
    except TrainingDiverged as err:
        return {"stopped": str(err)}
    return {"stopped": None}


def init_weights(spec: dict, path: Path) -> Path:
    """The seeded single-device initial weights every variant of this model starts from."""
    from safetensors.torch import save_file

    from llmpipe.training.trainer import build_model

    torch.manual_seed(SEED)
    model = build_model(model_config(spec), "cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main(out_dir: Path, specs: list[dict]) -> None:
    torch.set_num_threads(1)
    for spec in specs:
        init = init_path(out_dir, spec)
        kind = spec.get("kind", "train")
        rank = int(os.environ.get("RANK", "0"))  # the process group is joined by the first Trainer
        if kind != "train":
            result = run_pretrain_stage(spec, out_dir) if kind == "pretrain" else run_guard(spec, out_dir, init)
            (out_dir / f"{spec['name']}.rank{rank}.json").write_text(json.dumps(result))
            continue
        result = run_variant(spec, out_dir, init)
        (out_dir / f"{spec['name']}.rank{rank}.json").write_text(
            json.dumps({"dp_rank": result["dp_rank"], "rows": result["rows"], "probe": result["probe"]}))
        if env.is_main():
            torch.save({k: result[k] for k in ("losses", "grad_norms", "params", "loader")},
                       out_dir / f"{spec['name']}.pt")
    env.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
