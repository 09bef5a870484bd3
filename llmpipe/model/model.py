"""A decoder-only transformer in the Llama layout, written for one device.

Pre-norm residual blocks with RMSNorm, rotary position embeddings in the half-rotation layout
that Hugging Face Llama uses (so an export is a renaming of tensors), SwiGLU feed-forward,
grouped-query attention through `F.scaled_dot_product_attention`, optional tied embeddings and
no biases anywhere. Parallelism, compilation and activation-checkpoint policies are applied from
outside; this file knows about none of them.

Shapes: B batch, T time (sequence), C d_model, nh query heads, nkv key/value heads, hs head size,
V vocabulary, F feed-forward hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpipe.config import ModelSection


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # no copy when x is float32 already
        # mean(x^2) from the 2-norm: one reduction kernel and a short backward, where pow + mean take more
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]  # (B, T, 1)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps)).to(dtype)


def rope_tables(head_size: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, each (length, hs): frequencies repeated in two halves.

    The first half of sin is negated, so that `apply_rope` rotates with one roll and no negation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.int64, device=device).float() / head_size))
    positions = torch.arange(length, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    sign = torch.ones(head_size, device=device)
    sign[: head_size // 2] = -1.0
    return emb.cos(), emb.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hs/2) of x (B, n, T, hs) by the angles in cos/sin (T, hs) from `rope_tables`.

    x_i' = x_i cos - x_{i+hs/2} sin and x_{i+hs/2}' = x_{i+hs/2} cos + x_i sin: the roll brings each
    partner into place and sin carries the minus sign. Three kernels forward (mul, roll, addcmul)
    and no slices, whose backward would zero-fill and copy.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)  # x cos + roll(x) sin


LOSS_CHUNK_ROWS = 512  # rows of logits per chunk in `LinearCrossEntropy`: 20 MB of fp32 at V = 10k


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets (-1 ignored), a chunk of rows at
    a time, the gradients computed in the same pass.

    The (N, V) logits and their gradient never exist whole: each chunk's logits (rows x V) become
    the loss and, in place, the gradient softmax - one-hot, which goes straight into grad x and
    grad weight while the chunk is still in cache. The same three matmuls as
    `F.cross_entropy(F.linear(x, weight))`, a fraction of its memory traffic and no allocation as
    large as the logits (on CPU each fresh one is paid again in page faults). backward only scales
    the stored gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int, grad_enabled: bool):
        # x (N, C), weight (V, C), targets (N,)
        valid = targets != -1
        row_weight = valid / valid.sum()  # (N,) each row's share of the mean; 0 for ignored rows
        target = targets.clamp(min=0)[:, None]  # ignored rows pick class 0, then count for nothing
        loss = torch.zeros((), device=x.device)
        grad_x = torch.empty_like(x) if grad_enabled else None
        grad_weight = torch.zeros_like(weight) if grad_enabled else None
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (x[rows] @ weight.t()).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            loss += ((lse - logits.gather(1, target[rows]).squeeze(1)) * row_weight[rows]).sum()
            if grad_enabled:
                # softmax scaled by the row's weight, as one exp: exp(logit - lse + log w); w = 0 gives 0
                grad = logits.sub_((lse - row_weight[rows].log())[:, None]).exp_()
                grad.scatter_add_(1, target[rows], -row_weight[rows, None])  # - w * one-hot
                grad = grad.to(x.dtype)  # d(mean loss) / d logits
                grad_x[rows] = grad @ weight
                grad_weight += grad.t() @ x[rows]
            logits = grad = None  # free this chunk before the next chunk's logits exist
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len`, and the
    segment id of every stored token (see `Transformer.forward`)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_size: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_kv_heads, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.segments = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, max_len)
        self.pos = 0  # tokens already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at positions pos..pos+T-1; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, pos+T, hs)


def attention_mask(segments: torch.Tensor | None, T: int, start: int = 0,
                   key_segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which keys each query sees, (B, 1, T, start+T) bool, or None for plain causal attention.

    Query i (absolute slot start+i) sees key j <= start+i of the same segment: examples packed
    into one row never see each other, and left padding (segment 0) is invisible to the tokens
    after it. `key_segments` (B, start+T): the segments of every key, cached ones included.
    """
    if segments is None:
        return None
    keys = segments if key_segments is None else key_segments
    causal = torch.ones(T, start + T, dtype=torch.bool, device=segments.device).tril(diagonal=start)
    return (causal & (segments[:, :, None] == keys[:, None, :]))[:, None]  # (B, 1, T, start+T)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelSection, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_size = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_size, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_size, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_size, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_size, cfg.d_model, bias=False)
        self.wo.residual_projection = True  # init scaled by 1/sqrt(2 * n_layers)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # head counts come from the tensors: under tensor parallelism a rank holds nh/tp and nkv/tp heads
        q = self.wq(x).view(B, T, -1, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = k.shape[1] != q.shape[1]
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nkv, start+T, hs)
            if mask is None and T > 1:  # query i (absolute position start+i) sees keys 0..start+i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            # T == 1 without a mask: one new query sees the whole cache (is_causal would hide all but key 0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, C)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg: ModelSection):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.w_down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelSection, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x


HEADS = ("lm", "score")  # next-token logits (a language model), or one scalar per position (reward model, critic)


class Transformer(nn.Module):
    """The whole model; a pipeline stage is this model with some blocks deleted and, outside the
    first stage, no `tok_emb`, outside the last, no `norm_f` and `lm_head` (set to None).

    `head="score"` puts a scalar head `score` (d_model -> 1, Hugging Face's
    `LlamaForSequenceClassification` with one label) where the language-model head was: the
    forward then returns one score per position (B, T)."""

    def __init__(self, cfg: ModelSection, head: str = "lm"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r}: allowed values: {', '.join(HEADS)}")
        self.cfg, self.head = cfg, head
        self.head_size = cfg.d_model // cfg.n_heads
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # a dict keyed by layer index: parameter names stay stable when a pipeline stage drops blocks
        self.trf_blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        # with tied embeddings the output projection reuses tok_emb.weight: no second tensor exists
        self.lm_head = None if cfg.tie_embeddings or head != "lm" else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.score = nn.Linear(cfg.d_model, 1, bias=False) if head == "score" else None
        self.register_buffer("rope_cos", torch.empty(cfg.seq_len, self.head_size), persistent=False)  # (seq_len, hs)
        self.register_buffer("rope_sin", torch.empty(cfg.seq_len, self.head_size), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer. Callable again after `to_empty`, so a model built on the
        meta device (too big for one host) is initialised where it lives, shard by shard."""
        cos, sin = rope_tables(self.head_size, self.cfg.seq_len, self.cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        """GPT-2/Llama init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layers); norms 1."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight  # (V, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T), the mean cross-entropy instead;
        with `last_only`, the logits of the last position alone (B, 1, V), all that sampling needs.
        A score model returns its scores (B, T) (or (B, 1) with `last_only`).

        Targets equal to -1 are ignored. With a cache, idx holds the tokens after cache.pos. A
        pipeline stage without `tok_emb` takes the hidden state (B, T, C) as idx; one without
        `norm_f` returns the hidden state. `positions` (B, T): each token's rotary position
        (default: its slot, from cache.pos on); `segments` (B, T): a token attends only to earlier
        tokens of its own segment (packed examples, left padding). Without either, plain causal.
        """
        B, T = idx.shape[:2]
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.cfg.seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hs)
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hs)
        key_segments = None
        if cache is not None and segments is not None:
            cache.segments[:, start:start + T] = segments
            key_segments = cache.segments[:, :start + T]  # (B, start+T)
        mask = attention_mask(segments, T, start, key_segments)
        x = self.tok_emb(idx) if self.tok_emb is not None else idx  # (B, T, C)
        for block in self.trf_blocks.values():
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        if self.norm_f is None:
            return x
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm_f(x)
        if self.score is not None:
            return self.score(x).squeeze(-1)  # (B, T)
        if targets is not None and self.lm_head is None:
            # a tied head takes the chunked loss, which never builds the (B*T, V) logits; tensor
            # parallelism, which needs the lm_head module below, is never used with a tied head
            return LinearCrossEntropy.apply(x.flatten(0, 1), self.tok_emb.weight, targets.reshape(-1),
                                            LOSS_CHUNK_ROWS, torch.is_grad_enabled())
        # a module call, not F.linear on its weight: tensor parallelism hooks into lm_head's forward
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.output_weight())  # (B, T, V)
        return logits if targets is None else next_token_loss(logits, targets)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        w = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads or self.cfg.n_heads,
                       max_len or self.cfg.seq_len, self.head_size, device=w.device, dtype=w.dtype)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), ignoring targets equal to -1.

    Also the loss function of a pipeline's last stage, which gets logits rather than targets."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# --- sizes, computed from the config alone -----------------------------------------------------


def parameter_count(cfg: ModelSection, embedding: bool = True) -> int:
    """Number of parameters of Transformer(cfg); without `embedding`, the input table is left out."""
    hs, kv = cfg.d_model // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    attn = cfg.d_model * cfg.n_heads * hs * 2 + cfg.d_model * kv * hs * 2  # wq, wo, wk, wv
    mlp = 3 * cfg.d_model * cfg.d_ff
    per_block = attn + mlp + 2 * cfg.d_model  # two norm weights
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    total = cfg.n_layers * per_block + cfg.d_model + head  # + final norm
    if embedding or cfg.tie_embeddings:  # a tied table is also the output matrix: it always counts
        total += cfg.vocab_size * cfg.d_model
    return total


def flops_per_token(cfg: ModelSection, seq_len: int | None = None, head: str = "lm") -> float:
    """Training FLOPs (forward + backward) per token, PaLM appendix B convention.

    6 per weight of every matrix multiply (blocks and output head; the embedding lookup is no
    matmul) plus 12 * n_layers * d_model * T for attention scores and values (causal masking
    not discounted), so MFU figures compare with nanoGPT's and PaLM's. A score head (d_model -> 1)
    replaces the output head's vocab_size x d_model.
    """
    T = seq_len or cfg.seq_len
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    matmul_params = parameter_count(cfg, embedding=False) - norms  # blocks + output head (tied or not)
    if head == "score":
        matmul_params += cfg.d_model - cfg.vocab_size * cfg.d_model
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.d_model * T
