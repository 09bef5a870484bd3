"""Tensor- and pipeline-parallel plans in one process: how the model is cut, what is refused.

The multi-process equivalence with one process is in the distributed tests; here a fake process
group of 8 ranks (no communication, real shapes) checks that every matrix is cut where the
plan says and that the model runs on the shards.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from llmpipe.config import ModelSection, ParallelConfig
from llmpipe.distributed.pipeline import check_pipeline, prune_to_rank, rank_stages, stage_layers
from llmpipe.distributed.tensor_parallel import apply_tp, check_tp_degree
from llmpipe.model.model import Transformer

TINY = dict(vocab_size=320, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, tie_embeddings=False)


@pytest.fixture
def fake_world_of_8():
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    yield init_device_mesh("cpu", (8,), mesh_dim_names=("tp",))
    dist.destroy_process_group()


def test_tp_cuts_heads_hidden_units_and_vocabulary_over_8_ranks(fake_world_of_8):
    cfg = ModelSection(vocab_size=512, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8, d_ff=128, seq_len=16,
                       tie_embeddings=False)  # head size 4: 2 query heads and 1 key/value head per rank
    model = Transformer(cfg)
    apply_tp(model, fake_world_of_8)
    local = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    assert local["tok_emb.weight"] == (64, 64)  # vocabulary rows
    assert local["trf_blocks.0.attn.wq.weight"] == (8, 64)  # 2 heads * hs 4, output features
    assert local["trf_blocks.0.attn.wk.weight"] == local["trf_blocks.0.attn.wv.weight"] == (4, 64)
    assert local["trf_blocks.0.attn.wo.weight"] == (64, 8)  # input features
    assert local["trf_blocks.1.mlp.w_gate.weight"] == local["trf_blocks.1.mlp.w_up.weight"] == (16, 64)
    assert local["trf_blocks.1.mlp.w_down.weight"] == (64, 16)
    assert local["trf_blocks.0.attn_norm.weight"] == local["norm_f.weight"] == (64,)  # replicated
    assert local["lm_head.weight"] == (64, 64)
    logits = model(torch.zeros(2, 16, dtype=torch.long))
    assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
    assert logits.shape == (2, 16, 512) and logits.to_local().shape == (2, 16, 64)  # never gathered


def test_tp_degree_must_divide_heads_hidden_units_vocabulary_and_sequence():
    check_tp_degree(ModelSection(**TINY), 2)
    with pytest.raises(ValueError, match=r"^model.n_kv_heads=2, model.d_ff=66 must be divisible by parallel.tp=4$"):
        check_tp_degree(ModelSection(**{**TINY, "d_model": 64, "n_heads": 8, "d_ff": 66}), 4)


def test_stages_get_consecutive_blocks_the_first_ones_one_more():
    assert stage_layers(5, 2) == [["0", "1", "2"], ["3", "4"]]
    assert stage_layers(4, 4) == [["0"], ["1"], ["2"], ["3"]]
    assert rank_stages(1, ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=3)) == [1, 3, 5]
    assert rank_stages(1, ParallelConfig(pp=2, pp_schedule="1f1b", pp_virtual_stages=3)) == [1]


def test_pruned_ranks_hold_disjoint_parts_of_the_model_under_its_own_names():
    cfg = ParallelConfig(strategy="pp", pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    whole = Transformer(ModelSection(**{**TINY, "n_layers": 4}))
    parts = []
    for rank in range(2):
        model = Transformer(ModelSection(**{**TINY, "n_layers": 4}))
        model.load_state_dict(whole.state_dict())
        prune_to_rank(model, rank, cfg)
        parts.append(model.state_dict())
    # rank 0 runs stages 0 and 2 (blocks 0 and 2), rank 1 stages 1 and 3 (blocks 1 and 3)
    assert {k.split(".")[1] for k in parts[0] if k.startswith("trf_blocks")} == {"0", "2"}
    assert "tok_emb.weight" in parts[0] and "lm_head.weight" in parts[1] and "norm_f.weight" in parts[1]
    assert parts[0].keys().isdisjoint(parts[1].keys())
    assert parts[0].keys() | parts[1].keys() == whole.state_dict().keys()
    for part in parts:
        for name, tensor in part.items():
            assert torch.equal(tensor, whole.state_dict()[name])


def test_pipeline_refuses_too_few_blocks_or_micro_batches_naming_the_fields():
    with pytest.raises(ValueError, match=r"model.n_layers=3 must be >= parallel.pp \* stages per rank = 4"):
        check_pipeline(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), n_layers=3, microbatches=2)
    with pytest.raises(ValueError, match=r"pp_schedule=1f1b needs gradient accumulation steps .* = 1 >= parallel.pp=2"):
        check_pipeline(ParallelConfig(pp=2, pp_schedule="1f1b"), n_layers=4, microbatches=1)
    with pytest.raises(ValueError, match=r"= 3 to be a multiple of parallel.pp=2"):
        check_pipeline(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), n_layers=4, microbatches=3)
    check_pipeline(ParallelConfig(pp=2, pp_schedule="gpipe"), n_layers=2, microbatches=1)
