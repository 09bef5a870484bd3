"""Tensor parallel, the three pipeline schedules and 2-D FSDP x TP against one process on the same
global batch, and pipeline checkpoints resumed by one process.

One 2-process launch runs every tp and pp variant, one 4-process launch the 2-D ones
(tests/distributed_worker.py); the references run here without a process group. The global batch
is 8 sequences: with tp and pp every rank sees all of it (no data parallelism), so
micro_batch_size 8 is 1 micro-batch per step, 4 is 2 and 2 is 4 (the pipeline's micro-batches).
"""

import json

import pytest
from distributed_worker import init_path, init_weights, run_pretrain_stage
from model_fixtures import write_shards
from safetensors.torch import load_file
from test_distributed import assert_resumes_in_one_process, assert_variant_matches, launch, reference

TP = {"strategy": "tp", "tp": 2}
PP = {"strategy": "pp", "pp": 2}
TWO_PROCESSES = [
    {"name": "tp", **TP, "micro_batch_size": 8},
    {"name": "tp_accumulate", **TP, "micro_batch_size": 4},
    {"name": "tp_checkpointed", **TP, "micro_batch_size": 4, "activation_checkpointing": True},
    # no initial weights file: every rank builds the model from the seed, and must hold one process's weights
    {"name": "tp_from_seed", **TP, "micro_batch_size": 4, "from_seed": True},
    {"name": "pp_gpipe", **PP, "pp_schedule": "gpipe", "micro_batch_size": 8},
    {"name": "pp_gpipe_accumulate", **PP, "pp_schedule": "gpipe", "micro_batch_size": 2},
    {"name": "pp_1f1b", **PP, "pp_schedule": "1f1b", "micro_batch_size": 4},
    # blocks recomputed in backward: the stages are views of the wrapped blocks
    {"name": "pp_1f1b_checkpointed", **PP, "pp_schedule": "1f1b", "micro_batch_size": 4, "activation_checkpointing": True},
    # 4 stages of one block, two per rank (0 and 2 on rank 0)
    {"name": "pp_interleaved_1f1b", **PP, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2, "n_layers": 4,
     "micro_batch_size": 2},
    # resharding (FSDP-2 into TP-2 and PP-2 is in test_distributed.py): PP-2 saves at step 4, one process resumes
    {"name": "pp_save", **PP, "pp_schedule": "1f1b", "micro_batch_size": 4, "steps": 8, "checkpoint_every": 4,
     "stop_after": 4},
    # the pretrain stage under pp: 3 validation micro-batches through a schedule of 2 (the last call
    # padded), release weights gathered from both stages
    {"name": "pretrain_pp", "kind": "pretrain", "strategy": "pp", "parallel": {"pp": 2, "pp_schedule": "1f1b"},
     "pretrain": {"eval_steps": 3}},
]
FOUR_PROCESSES = [  # 2 FSDP groups x TP 2: micro_batch_size 4 is 1 micro-batch per step and group, 2 is 2
    {"name": "fsdp_tp", "strategy": "fsdp_tp", "tp": 2, "micro_batch_size": 4},
    {"name": "fsdp_tp_accumulate", "strategy": "fsdp_tp", "tp": 2, "micro_batch_size": 2},
    {"name": "fsdp_tp_accumulate_sync", "strategy": "fsdp_tp", "tp": 2, "micro_batch_size": 2, "grad_sync": "micro_batch"},
    {"name": "fsdp_tp_from_seed", "strategy": "fsdp_tp", "tp": 2, "micro_batch_size": 4, "from_seed": True},
]
EQUIVALENT = [s["name"] for s in TWO_PROCESSES if s.get("kind", "train") == "train" and "stop_after" not in s]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_pp")
    for layers in (2, 4):
        init_weights({"n_layers": layers}, init_path(out, {"n_layers": layers}))
    write_shards(out / "shards")
    seconds = launch(out, TWO_PROCESSES, nproc=2)
    print(f"\n2-process launch: {len(TWO_PROCESSES)} tp/pp variants in {seconds:.1f} s")
    seconds = launch(out, FOUR_PROCESSES, nproc=4)
    print(f"4-process launch: {len(FOUR_PROCESSES)} fsdp_tp variants in {seconds:.1f} s")
    refs = {(6, 2, False): reference(out, {"name": "ref6"}),
            (6, 4, False): reference(out, {"name": "ref6_layers4", "n_layers": 4}),
            (6, 2, True): reference(out, {"name": "ref6_from_seed", "from_seed": True}),
            (8, 2, False): reference(out, {"name": "ref8", "steps": 8})}
    return out, refs


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", EQUIVALENT + [s["name"] for s in FOUR_PROCESSES])
def test_strategy_matches_one_process(runs, name):
    out, refs = runs
    spec = next(s for s in TWO_PROCESSES + FOUR_PROCESSES if s["name"] == name)
    assert_variant_matches(out, spec, refs[(spec.get("steps", 6), spec.get("n_layers", 2), spec.get("from_seed", False))])


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_checkpoint_resumes_in_one_process(runs):
    """Saved by two pipeline stages at step 4 (each rank its layers), resumed without a process group."""
    out, refs = runs
    assert_resumes_in_one_process(out, "pp_save", refs[(8, 2, False)])


@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_stage_on_a_pipeline_matches_one_process(runs):
    """run_pretrain on 2 stages: validation through the schedule and release weights from both stages."""
    out, _ = runs
    spec = next(s for s in TWO_PROCESSES if s["name"] == "pretrain_pp")
    ranks = [json.loads((out / f"pretrain_pp.rank{r}.json").read_text()) for r in range(2)]
    one = run_pretrain_stage({**spec, "name": "pretrain_pp_single", "strategy": "ddp", "parallel": {}}, out)
    assert ranks[0]["steps"] == one["steps"] == 8 and ranks[0]["accumulation"] == 2 == one["accumulation"]
    for rank in ranks:  # the last stage's numbers, on every rank
        assert abs(rank["train_loss"] - one["train_loss"]) < 1e-5 and abs(rank["val_loss"] - one["val_loss"]) < 1e-5
    a, b = load_file(str(out / "pretrain_pp" / "model.safetensors")), load_file(str(out / "pretrain_pp_single" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
