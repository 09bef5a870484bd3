"""The generic trainer on one process: a stage's own step function and metrics, the per-step
callbacks, building a model from a config, from upstream weights or on the meta device, and
activation checkpointing applied from outside the model."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_fixtures import MODEL, PRETRAIN, synthetic_documents

from llmpipe.config import ModelSection, PretrainSection, TrainSection, load
from llmpipe.data.loader import TokenLoader
from llmpipe.distributed.parallelize import parallelize
from llmpipe.errors import BadValue
from llmpipe.model.release import save_release
from llmpipe.tracking import NullTracker
from llmpipe.training.trainer import (
    LoopState,
    Trainer,
    TrainTask,
    accumulation_steps,
    build_model,
    materialize,
    steady_tokens_per_s,
)


class ListTracker(NullTracker):
    """Keeps what the trainer logs."""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


REPO = Path(__file__).resolve().parents[1]


def stream() -> np.ndarray:
    return np.concatenate([np.concatenate([[0], d]) for d in synthetic_documents(200, seed=5)]).astype(np.uint16)


def masked_step(model, batch):
    """An SFT-like step: no loss on the first half of every window (the "prompt"), plus token accuracy."""
    x, y = batch
    y = y.clone()
    y[:, : y.shape[1] // 2] = -1
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    accuracy = (logits.argmax(-1) == y)[y >= 0].float().mean()
    return loss, {"accuracy": accuracy}


def test_a_stage_brings_its_own_step_function_and_metrics(tmp_path):
    model_cfg = ModelSection(**MODEL)
    cfg = PretrainSection(**{**PRETRAIN, "max_steps": 4, "log_every": 1, "micro_batch_size": 1})  # 4 micro-batches
    trainer = Trainer(model_cfg, cfg, seed=0)
    loader = TokenLoader([stream()], model_cfg.seq_len, cfg.micro_batch_size, seed=0)
    task = TrainTask("sft", masked_step, loader)
    seen, tracker = [], ListTracker()
    trainer.on_step_end.append(lambda state: seen.append((state.step, state.train_loss)))
    state = trainer.fit(task, LoopState(), ckpt_root=tmp_path / "ckpt", config={}, tracker=tracker)

    assert state.step == 4 and [s for s, _ in seen] == [1, 2, 3, 4]  # once per optimizer step, in order
    logged = {step: m for step, m in tracker.metrics if "train/loss" in m}
    assert [logged[s]["train/loss"] for s in (1, 2, 3, 4)] == [loss for _, loss in seen]
    assert all(0.0 <= logged[s]["train/accuracy"] <= 1.0 for s in logged)

    # step 1's loss is the step function's mean over that step's 4 micro-batches, on the initial weights
    torch.manual_seed(0)
    initial = build_model(model_cfg, "cpu")
    fresh = TokenLoader([stream()], model_cfg.seq_len, 1, seed=0)
    with torch.no_grad():
        expected = sum(masked_step(initial, fresh.next_batch())[0].item() for _ in range(4)) / 4
    assert seen[0][1] == pytest.approx(expected, abs=1e-6)


def test_timing_leaves_out_the_first_step_and_the_checkpoint(tmp_path):
    """The first step of a process (compilation, first allocations) is timed apart, neither wall
    time reaches state.json, and the optimizer is AdamW's fused kernel on CPU too."""
    model_cfg = ModelSection(**MODEL)
    cfg = PretrainSection(**{**PRETRAIN, "max_steps": 3, "checkpoint_every": 0})
    trainer = Trainer(model_cfg, cfg, seed=0)
    assert all(opt.defaults["fused"] for opt in trainer.optimizers)
    loader = TokenLoader([stream()], model_cfg.seq_len, cfg.micro_batch_size, seed=0)
    state = trainer.fit(TrainTask("pretrain", masked_step, loader), LoopState(), ckpt_root=tmp_path, config={})
    assert 0 < state.first_step_s < state.train_time_s
    saved = json.loads((next(tmp_path.glob("step_*")) / "state.json").read_text())
    assert "train_time_s" not in saved and "first_step_s" not in saved and saved["step"] == 3

    timed = LoopState(train_time_s=10.0, first_step_s=8.0)
    assert steady_tokens_per_s(timed, steps=3, tokens=300) == pytest.approx(100.0)  # 200 tokens in 2 s
    assert steady_tokens_per_s(LoopState(train_time_s=8.0, first_step_s=8.0), steps=1, tokens=100) == 12.5


def test_a_rank_runs_at_most_its_share_of_the_batch():
    """tiny's 16-sequence step on 2 data-parallel ranks: 8 sequences each at once, not 16 each
    (which would double the batch, or refuse it, as `--set pretrain.nproc=2` once did)."""
    cfg = load(REPO / "configs/tiny.yaml")
    train, seq_len = cfg.pretrain, cfg.model.seq_len
    assert train.micro_batch_for(seq_len, 1) == 16 and train.micro_batch_for(seq_len, 2) == 8
    assert accumulation_steps(train, train.micro_batch_for(seq_len, 2) * seq_len, dp=2) == 1
    small = train.model_copy(update={"micro_batch_size": 4})
    assert small.micro_batch_for(seq_len, 2) == 4 and accumulation_steps(small, 4 * seq_len, dp=2) == 2
    with pytest.raises(BadValue, match="pretrain.batch_tokens=4096 must be a multiple of"):
        accumulation_steps(train, train.micro_batch_for(seq_len, 3) * seq_len, dp=3)  # 5 sequences x 3 ranks


def test_a_model_starts_from_upstream_weights(tmp_path):
    model_cfg = ModelSection(**MODEL)
    torch.manual_seed(123)
    upstream = build_model(model_cfg, "cpu")
    save_release(upstream, tmp_path)
    loaded = build_model(model_cfg, "cpu", init_from=tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(upstream.state_dict().values(), loaded.state_dict().values()))
    trainer = Trainer(model_cfg, PretrainSection(**PRETRAIN), seed=0, init_from=tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(upstream.state_dict().values(),
                                                 trainer.model_parts[0].state_dict().values()))


def test_a_meta_model_is_initialised_where_it_lives():
    model_cfg = ModelSection(**MODEL)
    model = build_model(model_cfg, "meta")
    assert all(p.is_meta for p in model.parameters())
    materialize([model], torch.device("cpu"), seed=0)
    reference = build_model(model_cfg, "cpu")
    assert torch.equal(model.rope_cos, reference.rope_cos) and torch.equal(model.rope_sin, reference.rope_sin)
    weight = model.trf_blocks["0"].attn.wq.weight
    assert torch.isfinite(weight).all() and abs(weight.std().item() - model_cfg.init_std) < 0.005
    assert torch.equal(model.norm_f.weight, torch.ones(model_cfg.d_model))


def test_activation_checkpointing_is_applied_from_outside():
    """parallelize wraps each block: the same loss and gradients, the same parameter names, and
    each block's forward runs again in backward."""
    model_cfg = ModelSection(**MODEL)
    torch.manual_seed(0)
    plain = build_model(model_cfg, "cpu")
    wrapped = copy.deepcopy(plain)
    parallelize(wrapped, None, TrainSection(activation_checkpointing=True), device=torch.device("cpu"))
    assert type(wrapped.trf_blocks["0"]).__name__ == "CheckpointWrapper"
    assert list(wrapped.state_dict()) == list(plain.state_dict())

    calls = {"plain": 0, "wrapped": 0}
    for name, model in (("plain", plain), ("wrapped", wrapped)):
        model.get_submodule("trf_blocks.0.mlp" if name == "plain" else "trf_blocks.0._checkpoint_wrapped_module.mlp") \
            .register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    x = torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_len"]))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for model in (plain, wrapped):
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    # a pre-hook: the recomputation stops as soon as backward has what it needs, before the block ends
    assert calls == {"plain": 1, "wrapped": 2}  # recomputed in backward
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
