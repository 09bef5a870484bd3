"""Conversations -> token ids, loss masks, packed or padded rows, and completion log-probs.

The one place that renders a conversation for the model: SFT, DPO, the reward model, PPO and
evaluation all call it, so "which tokens are the assistant's" has one answer.

Rendering is the tokenizer's chat template (`llmpipe.tokenizer.chat`): an end-of-text token, then
`<|role|>content<|end|>` per turn. Encoding turn by turn gives the ids of encoding the rendered
string (every boundary is a special token, which the tokenizer splits on before BPE), and says
which ids are the assistant's: its content and its `<|end|>`, the token that stops generation,
but not the `<|assistant|>` role token that the generation prompt already supplies (TRL's
`assistant_only_loss`).

A completion's log-prob is TRL's: the summed log-probs of the tokens of the rendered
conversation after the rendered prompt with its generation prompt, so the closing `<|end|>`
counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from llmpipe.tokenizer.chat import ROLE_TOKENS
from llmpipe.tokenizer.special import END_OF_TURN, EOT, PAD_ID, ordinary


@dataclass(frozen=True)
class Encoded:
    """A rendered conversation: ids and, per id, whether the model is trained to produce it."""

    ids: list[int]
    trained: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


class ChatEncoder:
    """Renders and encodes conversations with one tokenizer (special ids looked up once)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ordinary = ordinary(tokenizer)  # a message that reads "<|end|><|assistant|>" is text, not turns
        self.eot, self.end = tokenizer.token_to_id(EOT), tokenizer.token_to_id(END_OF_TURN)
        self.role = {role: tokenizer.token_to_id(token) for role, token in ROLE_TOKENS.items()}
        if None in (self.eot, self.end, *self.role.values()):
            raise ValueError("the tokenizer lacks llmpipe's special tokens (train it with the tokenizer stage)")

    def text(self, content: str) -> list[int]:
        return self._ordinary.encode(content, add_special_tokens=False).ids

    def conversation(self, messages: list[dict], add_generation_prompt: bool = False) -> Encoded:
        """`<|endoftext|>` + each turn; the assistant's content and `<|end|>` are the trained ids."""
        ids, trained = [self.eot], [False]
        for message in messages:
            content = self.text(message["content"])
            assistant = message["role"] == "assistant"
            ids += [self.role[message["role"]], *content, self.end]
            trained += [False] + [assistant] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(self.role["assistant"])
            trained.append(False)
        return Encoded(ids, trained)

    def prompt(self, messages: list[dict]) -> list[int]:
        """What the model is fed to answer `messages`: the rendering with the generation prompt."""
        return self.conversation(messages, add_generation_prompt=True).ids

    def prompt_completion(self, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
        """(prompt ids with generation prompt, completion ids): together the rendered conversation."""
        whole = self.conversation(prompt + completion).ids
        head = self.prompt(prompt)
        if whole[:len(head)] != head:  # the template guarantees it; a completion must start with the assistant
            raise ValueError("the completion does not start with an assistant turn")
        return head, whole[len(head):]


# --- rows for the trainer --------------------------------------------------------------------------


def shifted(example: Encoded) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: targets are the next ids, -1 where not trained."""
    targets = [t if keep else -1 for t, keep in zip(example.ids[1:], example.trained[1:])]
    return example.ids[:-1], targets


def pack(examples: list[Encoded], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Examples (in the given order) packed greedily into rows of `seq_len` inputs: each row holds
    whole examples, `segments` numbers them (1, 2, ...; padding 0) and `positions` restart at 0
    with each, so attention and rotary positions never cross an example (`Transformer.forward`)."""
    rows, current = [], []
    used = 0
    for example in examples:
        n = len(example) - 1
        if n > seq_len:
            raise ValueError(f"an example of {n + 1} tokens does not fit seq_len={seq_len}")
        if used + n > seq_len:
            rows.append(_packed_row(current, seq_len))
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        rows.append(_packed_row(current, seq_len))
    return rows


def _packed_row(examples: list[Encoded], seq_len: int) -> dict[str, torch.Tensor]:
    inputs, targets, positions, segments = [], [], [], []
    for number, example in enumerate(examples, start=1):
        x, y = shifted(example)
        inputs += x
        targets += y
        positions += range(len(x))
        segments += [number] * len(x)
    pad = seq_len - len(inputs)
    # padding: its own segment (0), so it attends only to itself and no example attends to it
    return {"input_ids": torch.tensor(inputs + [PAD_ID] * pad), "targets": torch.tensor(targets + [-1] * pad),
            "positions": torch.tensor(positions + list(range(pad))), "segments": torch.tensor(segments + [0] * pad)}


def padded(examples: list[Encoded]) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest: plain causal attention is exact (no real
    token attends to the padding after it), so no mask is needed."""
    shifted_rows = [shifted(e) for e in examples]
    width = max(len(x) for x, _ in shifted_rows)
    return {"input_ids": torch.tensor([x + [PAD_ID] * (width - len(x)) for x, _ in shifted_rows]),
            "targets": torch.tensor([y + [-1] * (width - len(y)) for _, y in shifted_rows])}


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of `Transformer.forward` that a row batch carries."""
    return {key: batch[key] for key in ("positions", "segments") if key in batch}


def left_padded(prompts: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths for `generate`: ids (B, T) left-padded with the pad id, and
    the mask (B, T) True on real tokens."""
    width = max(len(ids) for ids in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, mask


# --- completion log-probs (DPO, the reward model's data, PPO, evaluation) ------------------------


def completion_batch(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) per row -> right-padded inputs and targets where only the
    completion's ids are targets (the first completion id is predicted from the prompt's last)."""
    rows = []
    for head, tail in pairs:
        ids = head + tail
        targets = [-1] * (len(head) - 1) + tail
        rows.append((ids[:-1], targets))
    width = max(len(x) for x, _ in rows)
    return {"input_ids": torch.tensor([x + [PAD_ID] * (width - len(x)) for x, _ in rows]),
            "targets": torch.tensor([y + [-1] * (width - len(y)) for _, y in rows])}


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target (B, T) from logits (B, T, V); 0 where the target is -1."""
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return (picked - torch.logsumexp(logits, dim=-1)) * (targets != -1)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each row's targets (B,), from logits (B, T, V); targets -1 are skipped."""
    return token_logps(logits, targets).sum(dim=-1)


def completion_logps(forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs (B,) of a `completion_batch` under the model `forward`."""
    return sequence_logps(forward(batch["input_ids"]), batch["targets"])


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as ids: the prompt (with generation prompt) and each completion after it."""

    index: int  # the row's position in the preference file(s) as read
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def encode_pairs(encoder: ChatEncoder, pairs: list, max_length: int, counts) -> list[EncodedPair]:
    """Encoded preference pairs; one whose prompt + longer completion exceeds `max_length` tokens
    is skipped and counted (the reference cache, DPO and the reward model keep the same pairs)."""
    kept = []
    for pair in pairs:
        prompt, chosen = encoder.prompt_completion(pair.prompt, pair.chosen)
        _, rejected = encoder.prompt_completion(pair.prompt, pair.rejected)
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            counts.skip(f"longer than max_length={max_length} tokens", pair.source)
        else:
            kept.append(EncodedPair(pair.index, prompt, chosen, rejected))
    counts.require_rows(kept)
    return kept


def pair_batch(pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
    """The chosen completions (rows 0..B-1), then the rejected ones (B..2B-1), in one padded batch;
    `index` (B,) says which pairs they are."""
    batch = completion_batch([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs])
    batch["index"] = torch.tensor([p.index for p in pairs])
    return batch


# --- sequence scores (the reward model; PPO's reward and critic) -----------------------------------


def score_batch(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Whole rendered sequences, right-padded with the pad id; `last` (B,): each row's last real
    position, where a score model's score is read (the rightmost non-pad token, as transformers'
    sequence classification reads it)."""
    width = max(len(s) for s in sequences)
    return {"input_ids": torch.tensor([s + [PAD_ID] * (width - len(s)) for s in sequences]),
            "last": torch.tensor([len(s) - 1 for s in sequences])}


def last_real_position(mask: torch.Tensor) -> torch.Tensor:
    """The rightmost True of each row of `mask` (B, T) (real tokens), padding on either side: (B,)."""
    return (torch.arange(mask.shape[-1], device=mask.device) * mask).argmax(dim=-1)


def scores_at(scores: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Per-position scores (B, T) read at positions `last` (B,): (B,)."""
    return scores.gather(1, last[:, None]).squeeze(1)


def pair_score_batch(pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
    """The whole chosen conversations (rows 0..B-1), then the rejected ones (B..2B-1), for a score model."""
    return score_batch([p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs])
