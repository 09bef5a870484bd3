"""Pretraining on tiny CPU models: loader order and state, schedule, checkpoints, exact resume, guards."""

import json
import os

import numpy as np
import pytest
import torch
from model_fixtures import MODEL, PRETRAIN, VOCAB, make_run_dir, run_config, write_shards
from safetensors.torch import load_file

from llmpipe import io, stages
from llmpipe.config import ModelSection, PretrainSection
from llmpipe.data.loader import TokenLoader
from llmpipe.training import checkpoint
from llmpipe.training.optim import build_optimizer, lr_at
from llmpipe.training.pretrain import run_pretrain, unigram_entropy
from llmpipe.training.trainer import TrainingDiverged


def streams(n=3, length=1000):
    return [np.arange(i * 10_000, i * 10_000 + length, dtype=np.uint32) for i in range(n)]


def test_loader_batches_are_shifted_windows():
    x, y = TokenLoader(streams(), 16, 4, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1] - x[:, 0], torch.full((4,), 16))  # windows are contiguous in one shard


def test_loader_visits_every_window_once_per_epoch_in_a_seeded_order():
    loader = TokenLoader(streams(), 16, 4, seed=1)
    n = loader.total_windows  # 3 * (999 // 16) = 186
    starts = [int(v) for _ in range(n // 2) for v in loader.next_batch()[0][:, 0]]  # 93 batches of 4 = 2 epochs
    first, second = starts[:n], starts[n:]
    assert sorted(first) == sorted(second) and len(set(first)) == n
    assert first != second  # each epoch has its own order
    other = TokenLoader(streams(), 16, 4, seed=2)
    assert [int(v) for v in other.next_batch()[0][:, 0]] != starts[:4]


def test_loader_resumes_from_its_state_dict():
    a = TokenLoader(streams(), 16, 4, seed=3)
    for _ in range(50):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON, as in a checkpoint
    b = TokenLoader(streams(), 16, 4, seed=3)
    b.load_state_dict(state)
    for _ in range(60):  # across the epoch boundary
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(streams(), 16, 4, seed=4).load_state_dict(state)


def test_ranks_split_the_global_batch():
    whole = TokenLoader(streams(), 16, 6, seed=5)
    ranks = [TokenLoader(streams(), 16, 2, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        assert torch.equal(whole.next_batch()[0], torch.cat([r.next_batch()[0] for r in ranks]))


def test_loader_resumes_on_another_world_size():
    """The position is global: 1 rank x 4 windows, saved, continues as 2 ranks x 2 and 4 ranks x 1."""
    whole = TokenLoader(streams(), 16, 4, seed=3)
    for _ in range(10):
        whole.next_batch()
    state = json.loads(json.dumps(whole.state_dict()))
    for world, per_rank in ((2, 2), (4, 1)):
        ranks = [TokenLoader(streams(), 16, per_rank, seed=3, rank=r, world_size=world) for r in range(world)]
        for r in ranks:
            r.load_state_dict(state)
        reference = TokenLoader(streams(), 16, 4, seed=3)
        reference.load_state_dict(state)
        for _ in range(60):  # across the epoch boundary
            assert torch.equal(reference.next_batch()[0], torch.cat([r.next_batch()[0] for r in ranks]))


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    cfg = PretrainSection(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(0, PretrainSection(max_steps=3, warmup_steps=10, lr=1.0)) == pytest.approx(1 / 3)


def test_weight_decay_only_on_matrices():
    from llmpipe.model import Transformer

    model = Transformer(ModelSection(**MODEL))
    decay, no_decay = build_optimizer(model, PretrainSection(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_unigram_entropy():
    uniform = [np.arange(256, dtype=np.uint16)]
    assert unigram_entropy(uniform, 300) == pytest.approx(np.log(256))
    assert unigram_entropy([np.zeros(10, dtype=np.uint16)], 300) == 0.0


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_kill_and_resume_equals_the_uninterrupted_run_exactly(tmp_path):
    shards = write_shards(tmp_path / "shard")
    model_cfg, cfg = ModelSection(**MODEL), PretrainSection(**PRETRAIN)
    whole = run_pretrain(model_cfg, cfg, shards, tmp_path / "a", seed=7)
    part = run_pretrain(model_cfg, cfg, shards, tmp_path / "b", seed=7, stop_after=5)  # killed after step 5
    assert part["steps"] == 5 and not (tmp_path / "b" / "model.safetensors").exists()
    assert checkpoint.complete_steps(tmp_path / "b" / "checkpoints") == [4]
    resumed = run_pretrain(model_cfg, cfg, shards, tmp_path / "b", seed=7)  # a new process would do the same
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == whole["steps"] == 8
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["val_loss"] == whole["val_loss"]
    assert resumed["tokens"] == whole["tokens"] == 8 * 128


def test_latest_checkpoint_skips_partial_and_corrupt_folders(tmp_path):
    shards = write_shards(tmp_path / "shard")
    run_pretrain(ModelSection(**MODEL), PretrainSection(**{**PRETRAIN, "checkpoint_every": 2, "keep_checkpoints": 3}),
                 shards, tmp_path / "a", seed=7)
    root = tmp_path / "a" / "checkpoints"
    assert checkpoint.complete_steps(root) == [4, 6, 8]  # only the newest 3 kept
    (root / "step_0000009").mkdir()  # a writer killed before files.json: never "latest"
    (root / "step_0000009" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(root).name == "step_0000008"
    with open(root / "step_0000008" / "__0_0.distcp", "r+b") as f:  # a flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert checkpoint.latest(root).name == "step_0000006"


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "shard")
    real, calls = torch.nn.utils.get_total_norm, []

    def total_norm(grads, *args, **kwargs):
        calls.append(1)
        norm = real(grads, *args, **kwargs)
        return torch.tensor(float("nan")) if len(calls) == 7 else norm

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", total_norm)
    with pytest.raises(TrainingDiverged, match=r"step 7: .* not finite.*step_0000004"):
        run_pretrain(ModelSection(**MODEL), PretrainSection(**PRETRAIN), shards, tmp_path / "a", seed=7)
    assert checkpoint.latest(tmp_path / "a" / "checkpoints").name == "step_0000004"


def test_spike_guard(tmp_path):
    from llmpipe.training.trainer import LoopState, _guard

    cfg = PretrainSection(spike_factor=2.0, spike_warmup=10)
    _guard(5, 100.0, 1.0, LoopState(loss_ema=3.0), cfg, None)  # not armed yet
    _guard(20, 5.0, 1.0, LoopState(loss_ema=3.0), cfg, None)
    with pytest.raises(TrainingDiverged, match="running mean"):
        _guard(20, 7.0, 1.0, LoopState(loss_ema=3.0), cfg, None)
    with pytest.raises(ValueError, match="spike_factor"):
        PretrainSection(spike_factor=0.5)


def test_batch_tokens_must_split_into_micro_batches(tmp_path):
    shards = write_shards(tmp_path / "shard")
    with pytest.raises(ValueError, match="batch_tokens=100 must be a multiple"):
        run_pretrain(ModelSection(**MODEL), PretrainSection(**{**PRETRAIN, "batch_tokens": 100}), shards, tmp_path / "a", seed=7)


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    """An uninterrupted 8-step pretraining run (checkpoints at steps 4 and 8)."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("completed") / "run")
    return run_dir, stages.execute("pretrain", run_config(run_dir)).manifest


def test_pretrain_stage_writes_release_weights_and_resumes_when_complete(completed):
    run_dir, manifest = completed
    config = run_config(run_dir)
    counts = manifest["counts"]
    assert counts["steps"] == 8 and counts["tokens"] == 1024
    assert counts["val_loss"] < counts["unigram_entropy"] + 1.5  # learning has started (8 steps only)
    assert {"model.safetensors", "model_config.json", "train_config.json"} <= set(manifest["files"])
    assert "checkpoints/step_0000008/__0_0.distcp" in manifest["files"]  # DCP: model and optimizer
    again = stages.execute("pretrain", config).manifest  # same key: the final checkpoint is found, nothing retrains
    assert again["counts"]["resumed_from_step"] == 8
    assert again["files"]["model.safetensors"] == manifest["files"]["model.safetensors"]


@pytest.mark.parametrize(("fault", "resumed_from"), [
    ("checkpoint:writing_step_8", 4),  # the DCP shards of step 8 written, not its files.json nor its rename
    ("write:model.safetensors", 8),  # the release weights written, not renamed
])
def test_killed_while_a_checkpoint_or_the_weights_are_written_resumes_to_the_same_weights(completed, tmp_path, fault, resumed_from):
    from llmpipe.distributed.launch import WorkerFailed

    run_dir = make_run_dir(tmp_path / "run")
    config = run_config(run_dir)
    os.environ["LLMPIPE_FAULT"] = fault
    try:
        with pytest.raises(WorkerFailed, match="SIGKILL"):
            stages.execute("pretrain", config)
    finally:
        del os.environ["LLMPIPE_FAULT"]
    folder = run_dir / "pretrain"
    assert not (folder / "manifest.json").exists() and not (folder / "model.safetensors").exists()
    assert checkpoint.complete_steps(folder / "checkpoints")[-1] == resumed_from  # a partial one is never taken
    counts = stages.execute("pretrain", config).manifest["counts"]
    assert counts["resumed_from_step"] == resumed_from and counts["steps"] == 8
    assert io.sha256_file(folder / "model.safetensors") == completed[1]["files"]["model.safetensors"]["sha256"]


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_same_weights(tmp_path):
    """A real kill: `python -m llmpipe.training.pretrain` SIGKILLed after a checkpoint, then rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from llmpipe.io import sha256_file

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"run": {"seed": 7}, "tokenizer": {"vocab_size": VOCAB}, "model": MODEL,
                                      "pretrain": {**PRETRAIN, "max_steps": 60, "checkpoint_every": 5,
                                                   "eval_every": 30, "log_every": 30}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def command(run_dir):
        return [sys.executable, "-m", "llmpipe.training.pretrain", "--config", str(config), "--run-dir", str(run_dir)]

    for name in ("a", "b"):
        make_run_dir(tmp_path / name)
    # the uninterrupted run beside the one to kill: one thread each, two cores
    uninterrupted = subprocess.Popen(command(tmp_path / "a"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen(command(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "b" / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 300
    while not checkpoint.complete_steps(ckpts) or checkpoint.complete_steps(ckpts)[-1] < 10:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "pretrain" / "manifest.json").exists()
    killed_at = checkpoint.complete_steps(ckpts)[-1]
    assert 10 <= killed_at < 60
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()
    subprocess.run(command(tmp_path / "b"), check=True, env=env, capture_output=True)
    manifest = json.loads((tmp_path / "b" / "pretrain" / "manifest.json").read_text())
    assert manifest["counts"]["resumed_from_step"] == killed_at
    weights = [sha256_file(tmp_path / n / "pretrain" / "model.safetensors") for n in ("a", "b")]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    from llmpipe.data.loader import Permutation

    assert sorted(Permutation(n, key=n)(i) for i in range(n)) == list(range(n))
    if n >= 17:
        assert [Permutation(n, 1)(i) for i in range(n)] != [Permutation(n, 2)(i) for i in range(n)]


def test_batches_mix_all_shards():
    loader = TokenLoader(streams(4, 4000), 16, 32, seed=0)
    x, _ = loader.next_batch()
    assert len({int(v) // 10_000 for v in x[:, 0]}) == 4


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """`compile: true` in one process compiles the whole model, the chunked loss included: the same
    losses and weights as eager (to fp32 rounding: inductor fuses differently), the same names."""
    from torch._dynamo.utils import counters

    shards = write_shards(tmp_path / "shard")
    model_cfg = ModelSection(**MODEL)
    results = {}
    counters.clear()
    for compiled in (False, True):
        cfg = PretrainSection(**{**PRETRAIN, "max_steps": 4, "eval_every": 4, "checkpoint_every": 0, "compile": compiled})
        results[compiled] = run_pretrain(model_cfg, cfg, shards, tmp_path / str(compiled), seed=7)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile
    assert results[True]["train_loss"] == pytest.approx(results[False]["train_loss"], abs=1e-4)
    assert results[True]["val_loss"] == pytest.approx(results[False]["val_loss"], abs=1e-4)
    eager, compiled = _weights(tmp_path / "False"), _weights(tmp_path / "True")
    assert eager.keys() == compiled.keys()
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-4) for k in eager)
