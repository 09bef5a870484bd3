"""`llmpipe generate`: sample a completion from a stage's release weights with the KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from llmpipe.errors import BadValue
from llmpipe.model.generate import generate
from llmpipe.model.model import Transformer
from llmpipe.model.release import CONFIG, WEIGHTS, load_head, load_release
from llmpipe.paths import RunDir
from llmpipe.tokenizer.special import EOT_ID
from llmpipe.tokenizer.train import load_tokenizer


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise BadValue on sampling settings `sample_next` cannot use (temperature 0 is greedy)."""
    if temperature < 0:
        raise BadValue(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise BadValue(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise BadValue(f"top_p={top_p} must be in (0, 1]")


def load_stage_model(run_dir: Path, stage: str) -> tuple[Transformer, Tokenizer]:
    """A completed stage's release model (its weights re-hashed against the stage manifest) and
    the run's tokenizer. Any stage that writes release weights will do: pretrain, sft, dpo, ..."""
    from llmpipe.stages import verify_outputs

    run_dir = RunDir(run_dir)
    verify_outputs(run_dir, stage, [WEIGHTS, CONFIG])
    if load_head(run_dir.stage(stage)) != "lm":
        raise BadValue(f"stage {stage} holds a score model (a reward model), which does not generate; "
                       "use a language model's stage: pretrain, sft, dpo")
    return load_release(run_dir.stage(stage)), load_tokenizer(run_dir.tokenizer_dir)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids the model is fed for a plain-text prompt: an end-of-text token, then the text, as
    documents follow one in the training stream (an export's tokenizer adds the same token)."""
    return [EOT_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids


def generate_text(run_dir: Path, stage: str, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """The completion (without the prompt) of `prompt` by `stage`'s model; temperature 0 is greedy.

    The prompt is encoded by `prompt_ids`; sampling stops at the next end-of-text token, which
    is not returned.
    """
    check_sampling(temperature, top_k, top_p)
    model, tokenizer = load_stage_model(run_dir, stage)
    generator = torch.Generator().manual_seed(seed)
    new = generate(model, torch.tensor([prompt_ids(tokenizer, prompt)]), max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=generator, stop_id=EOT_ID)[0].tolist()
    if new and new[-1] == EOT_ID:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=False)
