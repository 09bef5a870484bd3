"""The `tokenizer` stage: byte-level BPE trained with `tokenizers` on the documents.

Byte-level means every string round-trips exactly: the pre-tokenizer maps bytes to 256
printable symbols (no prefix space, no normalizer), the decoder maps them back, so
`decode(encode(x), skip_special_tokens=False) == x` for any text. The special tokens of
`llmpipe.tokenizer.special` take the first ids (EOT is 0). The folder it writes loads with
`transformers.AutoTokenizer.from_pretrained(folder)` offline:

    tokenizer.json            the `tokenizers` model (what llmpipe itself loads)
    tokenizer_config.json     special tokens + chat template, for transformers
    special_tokens_map.json   the same special tokens, for older transformers
"""

from __future__ import annotations

import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmpipe import io
from llmpipe.config import TokenizerSection
from llmpipe.data.documents import DocumentCounts, read_documents
from llmpipe.errors import MissingInput
from llmpipe.tokenizer.chat import CHAT_TEMPLATE
from llmpipe.tokenizer.special import ASSISTANT, END_OF_TURN, EOT, PAD, SPECIAL_TOKENS, SYSTEM, UNK, USER

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"


class TokenizerNotFoundError(MissingInput):
    """No trained tokenizer where one is expected."""


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the pipeline's exact-round-trip settings."""
    tokenizer = Tokenizer(models.BPE())  # no unk: every byte has a token
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; ids untouched
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train BPE on `texts`. The same texts in the same order give the same tokenizer."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..6 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(texts), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise AssertionError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {i}")
    return tokenizer


def _chunks(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """Lists of texts: `train_from_iterator` takes batches in one call across the Rust boundary."""
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch


def hf_config(model_max_length: int | None = None) -> dict:
    """`tokenizer_config.json`: what transformers needs besides `tokenizer.json`."""
    added = {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # True would break the exact round trip
        "model_max_length": model_max_length or 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> list[Path]:
    """Write the tokenizer files into `folder`, each atomically. Returns their paths."""
    folder = Path(folder)
    config = hf_config()
    special_map = {key: config[key] for key in ("eos_token", "pad_token", "unk_token", "additional_special_tokens")}
    paths = [folder / TOKENIZER_FILE, folder / CONFIG_FILE, folder / SPECIAL_MAP_FILE]
    io.write_text(paths[0], tokenizer.to_str(pretty=True))
    io.write_json(paths[1], config)
    io.write_json(paths[2], special_map)
    return paths


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The trained `tokenizers.Tokenizer` from a tokenizer stage folder."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerNotFoundError(f"tokenizer not found: {path} (run the tokenizer stage first)")
    return Tokenizer.from_file(str(path))


def _budgeted(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Texts until `max_chars` characters have been given (the last one whole)."""
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_chars:
            return


def tokenizer_stage(ctx, cfg: TokenizerSection) -> dict:
    """Train on the documents (up to `cfg.max_chars` characters) and save into `ctx.out_dir`."""
    source = ctx.inputs["documents"]
    counts = DocumentCounts()
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(_budgeted(read_documents(source, counts), cfg.max_chars),
                                cfg.vocab_size, cfg.min_frequency)
    seconds = time.perf_counter() - t0
    save_tokenizer(tokenizer, ctx.out_dir)
    return {
        **counts.as_dict(),
        "vocab_size": tokenizer.get_vocab_size(),
        "special_tokens": [[token, tokenizer.token_to_id(token)] for token in SPECIAL_TOKENS],  # a detail
        "timing": {"seconds": seconds},  # this run's: MLflow only
    }


def copy_tokenizer(tokenizer_dir: Path, out: Path) -> list[str]:
    """Copy the tokenizer stage's files (tokenizer.json, tokenizer_config.json, ...) into `out`."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise MissingInput(f"{tokenizer_dir / 'tokenizer.json'} is missing (run `llmpipe tokenizer` first)")
    copied = []
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and path.name != "manifest.json" and not path.name.startswith(".") and path.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copyfile(path, Path(out) / path.name)
            copied.append(path.name)
    return copied


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("tokenizer")
