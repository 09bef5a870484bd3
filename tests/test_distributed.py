"""Every parallel strategy against one process on the same global batch, and checkpoints that reshard.

One torchrun launch per world size runs all its variants one after another (tests/distributed_worker.py);
the references run here, in this process, without a process group.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import init_path, init_weights, run_pretrain_stage, run_variant
from model_fixtures import write_shards
from safetensors.torch import load_file

from llmpipe.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")

# (name, spec): 2 processes; the global batch is 8 sequences, so micro_batch_size 4 is 1 micro-batch
# per step and rank, 2 is 2 (gradient accumulation without an all-reduce per micro-batch)
TWO_PROCESSES = [
    {"name": "ddp", "strategy": "ddp", "micro_batch_size": 4},
    {"name": "ddp_accumulate", "strategy": "ddp", "micro_batch_size": 2},
    {"name": "zero1_accumulate", "strategy": "zero1", "micro_batch_size": 2},
    {"name": "zero2", "strategy": "zero2", "micro_batch_size": 4},
    {"name": "zero2_accumulate", "strategy": "zero2", "micro_batch_size": 2},
    {"name": "fsdp", "strategy": "fsdp", "micro_batch_size": 4},
    # 8 sequences a micro-batch is more than a rank's share of the step: each runs its 4 at once
    {"name": "fsdp_share", "strategy": "fsdp", "micro_batch_size": 8},
    {"name": "fsdp_accumulate", "strategy": "fsdp", "micro_batch_size": 2},
    {"name": "fsdp_accumulate_sync", "strategy": "fsdp", "micro_batch_size": 2, "grad_sync": "micro_batch"},
    {"name": "fsdp_tied", "strategy": "fsdp", "micro_batch_size": 4, "tie_embeddings": True},
    # resharding: FSDP-2 stops after step 4 (a checkpoint); ZeRO-1, TP-2 and a 2-stage pipeline
    # resume it here, one process in test_fsdp_checkpoint_resumes_in_one_process
    {"name": "fsdp_save", "strategy": "fsdp", "micro_batch_size": 2, "steps": 8, "checkpoint_every": 4, "stop_after": 4},
    {"name": "fsdp_to_zero1", "strategy": "zero1", "micro_batch_size": 4, "steps": 8, "resume_from": "fsdp_save"},
    {"name": "fsdp_to_tp", "strategy": "tp", "tp": 2, "micro_batch_size": 2, "steps": 8, "resume_from": "fsdp_save"},
    {"name": "fsdp_to_pp", "strategy": "pp", "pp": 2, "pp_schedule": "1f1b", "micro_batch_size": 2, "steps": 8,
     "resume_from": "fsdp_save"},
    # ZeRO-1 saves each rank's partition of the optimizer state; one process resumes the union
    {"name": "zero1_save", "strategy": "zero1", "micro_batch_size": 2, "steps": 8, "checkpoint_every": 4,
     "stop_after": 4},
    # the pretrain stage as the launch worker runs it: FSDP, 2 micro-batches of 1 per rank and step
    {"name": "pretrain_fsdp", "kind": "pretrain", "strategy": "fsdp", "pretrain": {"micro_batch_size": 1}},
    {"name": "guard", "kind": "guard", "strategy": "ddp", "micro_batch_size": 4},
]
EQUIVALENT = [s["name"] for s in TWO_PROCESSES if s.get("kind", "train") == "train" and "stop_after" not in s]


def launch(out_dir: Path, specs: list[dict], nproc: int, timeout: float = 600) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), str(out_dir), json.dumps(specs)]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return time.perf_counter() - t0


def reference(out_dir: Path, spec: dict) -> dict:
    """One process (no process group) on the same global batch: micro-batches of 2, 4 per step."""
    torch.set_num_threads(1)
    spec = {"micro_batch_size": 2, **spec}
    return run_variant(spec, out_dir, init_path(out_dir, spec))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    for tied in (False, True):
        init_weights({"tie_embeddings": tied}, init_path(out, {"tie_embeddings": tied}))
    write_shards(out / "shards")
    seconds = launch(out, TWO_PROCESSES, nproc=2)
    print(f"\n2-process launch: {len(TWO_PROCESSES)} variants in {seconds:.1f} s")
    refs = {(6, False): reference(out, {"name": "ref6"}), (6, True): reference(out, {"name": "ref6_tied", "tie_embeddings": True}),
            (8, False): reference(out, {"name": "ref8", "steps": 8})}
    return out, refs


def _load(out: Path, name: str) -> tuple[dict, dict[int, list[str]]]:
    """Rank 0's results and, per step, the rows all data-parallel ranks trained on (sorted)."""
    result = torch.load(out / f"{name}.pt", weights_only=True)
    rows: dict[int, list[str]] = {}
    seen_dp = set()
    for path in sorted(out.glob(f"{name}.rank*.json")):
        record = json.loads(path.read_text())
        if record["dp_rank"] in seen_dp:  # tensor-parallel ranks share their data-parallel rank's rows
            continue
        seen_dp.add(record["dp_rank"])
        for step, step_rows in record["rows"].items():
            rows.setdefault(int(step), []).extend(step_rows)
    return result, {k: sorted(v) for k, v in rows.items()}


def _assert_matches(result: dict, rows: dict, ref: dict, steps: range) -> None:
    ref_rows = {k: sorted(v) for k, v in ref["rows"].items()}
    for step in steps:
        assert rows[step] == ref_rows[step], f"step {step} trained on other samples"
        assert abs(result["losses"][step] - ref["losses"][step]) < 1e-5, (step, result["losses"][step], ref["losses"][step])
        assert abs(result["grad_norms"][step] - ref["grad_norms"][step]) < 1e-5, (step, result["grad_norms"][step])
    assert sorted(result["losses"]) == list(steps)
    params, ref_params = result["params"], ref["params"]
    assert params.keys() == ref_params.keys()
    worst = max((params[k] - ref_params[k]).abs().max().item() for k in params)
    assert worst < 1e-4, worst


def assert_resumes_in_one_process(out: Path, saved: str, ref: dict) -> dict:
    """Variant `saved` stopped after step 4; this process resumes its checkpoint: steps 5-8 as `ref`."""
    result, _ = _load(out, saved)
    assert sorted(result["losses"]) == [1, 2, 3, 4]
    resumed = reference(out, {"name": f"{saved}_to_single", "steps": 8, "resume_from": saved})
    _assert_matches(resumed, {k: sorted(v) for k, v in resumed["rows"].items()}, ref, range(5, 9))
    return resumed


def assert_variant_matches(out: Path, spec: dict, ref: dict) -> None:
    """A variant's steps (5-8 when it resumed a step-4 checkpoint) against one process's."""
    result, rows = _load(out, spec["name"])
    steps = spec.get("steps", 6)
    _assert_matches(result, rows, ref, range(5 if "resume_from" in spec else 1, steps + 1))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", EQUIVALENT)
def test_strategy_matches_one_process(runs, name):
    out, refs = runs
    spec = next(s for s in TWO_PROCESSES if s["name"] == name)
    assert_variant_matches(out, spec, refs[(spec.get("steps", 6), spec.get("tie_embeddings", False))])


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(runs):
    """Saved by FSDP on 2 ranks at step 4, resumed here without a process group: steps 5-8 as uninterrupted."""
    out, refs = runs
    resumed = assert_resumes_in_one_process(out, "fsdp_save", refs[(8, False)])
    assert resumed["loader"] == refs[(8, False)]["loader"]


@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_stage_on_two_ranks_matches_one_process(runs, tmp_path):
    """run_pretrain under torchrun: the same initial weights from the seed, FSDP checkpoints,
    validation and the gathered release weights."""
    out, _ = runs
    spec = next(s for s in TWO_PROCESSES if s["name"] == "pretrain_fsdp")
    ranks = [json.loads((out / f"pretrain_fsdp.rank{r}.json").read_text()) for r in range(2)]
    one = run_pretrain_stage({**spec, "name": "pretrain_single"}, out)
    two = ranks[0]
    assert two["world_size"] == 2 and two["accumulation"] == 2 and one["accumulation"] == 4
    assert two["steps"] == one["steps"] == 8 and two["tokens"] == one["tokens"]
    assert abs(two["train_loss"] - one["train_loss"]) < 1e-5 and abs(two["val_loss"] - one["val_loss"]) < 1e-5
    assert ranks[1]["val_loss"] == two["val_loss"]  # every rank got the all-reduced numbers
    a, b = load_file(str(out / "pretrain_fsdp" / "model.safetensors")), load_file(str(out / "pretrain_single" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert checkpoint.complete_steps(out / "pretrain_fsdp" / "checkpoints") == [4, 8]
    assert sorted(p.name for p in (out / "pretrain_fsdp" / "checkpoints" / "step_0000008").glob("*.distcp")) \
        == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its shards


@pytest.mark.distributed
@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(runs):
    out, _ = runs
    stopped = [json.loads((out / f"guard.rank{r}.json").read_text())["stopped"] for r in range(2)]
    assert all(message is not None and message.startswith("step 3: loss nan") for message in stopped), stopped


@pytest.mark.distributed
@pytest.mark.slow
def test_when_accumulated_gradients_are_reduced(runs):
    """After the first of two micro-batches, DDP ranks hold their own, different gradients (no
    all-reduce yet) and FSDP ranks none at all (no reduce-scatter yet), unless asked to
    reduce-scatter every micro-batch: then they already hold sharded gradients."""
    out, _ = runs
    probes = {name: [json.loads((out / f"{name}.rank{r}.json").read_text())["probe"] for r in range(2)]
              for name in ("ddp_accumulate", "zero1_accumulate", "zero2_accumulate", "fsdp_accumulate",
                           "fsdp_accumulate_sync")}
    assert all(g == "dtensor" for rank in probes["fsdp_accumulate_sync"] for g in rank)
    for name in ("ddp_accumulate", "zero1_accumulate"):
        rank0, rank1 = probes[name]
        assert all(isinstance(g, float) for g in rank0 + rank1), name
        assert all(a != b for a, b in zip(rank0, rank1)), name
    for name in ("zero2_accumulate", "fsdp_accumulate"):
        assert all(g is None for rank in probes[name] for g in rank), name


@pytest.mark.distributed
@pytest.mark.slow
def test_zero1_checkpoint_resumes_in_one_process(runs):
    out, refs = runs
    assert_resumes_in_one_process(out, "zero1_save", refs[(8, False)])
