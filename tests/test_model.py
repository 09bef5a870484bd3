"""The transformer's invariants on tiny CPU models: causality, KV cache, sizes, learning."""

import pytest
import torch

from llmpipe.config import ModelSection
from llmpipe.model import Transformer, flops_per_token, generate, parameter_count, sample_next
from llmpipe.model.model import LinearCrossEntropy

TINY = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=32)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelSection(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_changing_a_future_token_never_changes_earlier_logits(kv):
    model = tiny_model(n_kv_heads=kv)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(idx)
        for t in (0, 7, 19):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 300
            after = model(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(after[:, t], before[:, t])


@pytest.mark.parametrize("kv", [None, 2])
def test_kv_cache_logits_equal_full_recomputation(kv):
    model = tiny_model(n_kv_heads=kv)
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = model.new_cache(2)
        pieces = [model(idx[:, :10], cache=cache), model(idx[:, 10:11], cache=cache),
                  model(idx[:, 11:17], cache=cache)]  # prefill, one token, a chunk on a longer cache
        pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(17, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_recomputation():
    model = tiny_model()
    prompt = torch.randint(0, 300, (3, 5))
    greedy_cached = generate(model, prompt, 20, temperature=0)
    greedy_full = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(greedy_cached, greedy_full)
    sampled = [generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.9, use_cache=c,
                        generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert greedy_cached.shape == (3, 20)


def test_last_only_logits_and_generated_ids_fit_for_training():
    model = tiny_model()
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:], rtol=0, atol=1e-6)
    out = generate(model, idx, 4, temperature=0)  # made in inference mode, returned as an ordinary tensor
    assert not out.is_inference()
    model.train()
    model(torch.cat([idx, out], dim=1), targets=torch.cat([idx, out], dim=1)).backward()  # rollouts can be trained on


def test_generation_stops_at_the_stop_token_and_fits_the_context():
    model = tiny_model()
    prompt = torch.randint(0, 300, (1, 40))  # longer than seq_len: cropped on the left
    out = generate(model, prompt, 100, temperature=0)
    assert out.shape[1] == 31  # context 32 - at least one prompt token
    first = int(out[0, 0])
    stopped = generate(model, prompt, 10, temperature=0, stop_id=first)
    assert stopped.tolist() == [[first]]


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.1, generator=g).item() for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} == {1, 2}


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"n_kv_heads": 2}])
def test_parameter_count_matches_the_module(overrides):
    model = tiny_model(**overrides)
    cfg = model.cfg
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = cfg.vocab_size * cfg.d_model  # the output matmul, tied or not
    expected = 6 * (linear + (head if cfg.tie_embeddings else 0)) + 12 * cfg.n_layers * cfg.d_model * cfg.seq_len
    assert flops_per_token(cfg) == expected


def test_gpt2_124m_size():
    cfg = ModelSection(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_ff=2048, seq_len=1024)
    assert 123e6 < parameter_count(cfg) < 125e6


def test_init_scales_residual_projections():
    model = tiny_model(d_model=256, d_ff=512, n_layers=8)
    std = model.trf_blocks["0"].attn.wq.weight.std().item()
    proj = model.trf_blocks["0"].attn.wo.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(proj - 0.02 / 4) < 0.0005  # 1 / sqrt(2 * 8)


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelSection(**{**TINY, "d_model": 30})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelSection(**{**TINY, "n_kv_heads": 3})


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model().train()
    x = torch.randint(0, 300, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.1


@pytest.mark.parametrize("chunk_rows", [7, 64, 4096])  # several chunks with a short last one, and one
def test_chunked_loss_equals_cross_entropy_of_the_logits(chunk_rows):
    """The tied head's fused loss: same loss and gradients as logits -> F.cross_entropy, -1 ignored."""
    torch.manual_seed(0)
    x = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::3] = -1
    loss = LinearCrossEntropy.apply(x, weight, targets, chunk_rows, True)
    (2.5 * loss).backward()  # an upstream gradient other than 1 must scale both
    grads = x.grad, weight.grad
    x.grad = weight.grad = None
    expected = torch.nn.functional.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, (x.grad, weight.grad), rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the same loss, no gradients computed
        assert LinearCrossEntropy.apply(x, weight, targets, chunk_rows, False).item() == pytest.approx(loss.item(), abs=1e-6)


def _small_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelSection(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    seq_len=32)).eval()


def test_packed_examples_see_neither_each_other_nor_shifted_positions():
    """Two examples packed in one row (segments, positions restarting) give each one's own logits."""
    model = _small_model()
    a, b = torch.randint(0, 320, (1, 7)), torch.randint(0, 320, (1, 11))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[1] * 7 + [2] * 11])
    positions = torch.cat([torch.arange(7), torch.arange(11)])[None]
    with torch.no_grad():
        logits = model(packed, positions=positions, segments=segments)
        alone = torch.cat([model(a), model(b)], dim=1)
        unmasked = model(packed)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    assert (unmasked[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # without the mask b would see a


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = _small_model(1)
    prompts = [torch.randint(3, 320, (n,)) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), 1), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts])
    batched = generate(model, ids, 8, temperature=0, prompt_mask=mask)
    for row, prompt in enumerate(prompts):
        assert batched[row].tolist() == generate(model, prompt[None], 8, temperature=0)[0].tolist()
    assert generate(model, ids, 8, temperature=0, prompt_mask=mask, use_cache=False).tolist() == batched.tolist()


def test_a_stopped_row_is_padded_and_tokens_stream_as_made():
    model = _small_model(2)
    ids = torch.randint(3, 320, (2, 5))
    free = generate(model, ids, 6, temperature=0)
    stop = int(free[0, 0])  # row 0 stops at its first token
    seen = []
    out = generate(model, ids, 6, temperature=0, stop_id=stop, pad_id=1, on_token=lambda t: seen.append(t.clone()))
    assert out[0, 0] == stop and set(out[0, 1:].tolist()) == {1}
    assert (out[1] == free[1, :out.size(1)]).all() or stop in free[1].tolist()
    assert torch.cat(seen, dim=1).tolist() == out.tolist()
