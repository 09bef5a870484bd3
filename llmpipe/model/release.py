"""Release weights: `model.safetensors` + `model_config.json` in a stage folder.

Training stages write them at the end; export, generation and later stages read them. Only
safetensors are read here, never pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmpipe import io
from llmpipe.config import ModelSection
from llmpipe.errors import MissingInput
from llmpipe.model.model import Transformer

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, atomically, readable by others like every other output (safetensors creates files 0600)."""
    with io.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)


def save_release(model: Transformer, folder: Path) -> None:
    write_release(model.state_dict(), model.cfg, folder, model.head)


def write_release(state: dict[str, torch.Tensor], cfg: ModelSection, folder: Path, head: str = "lm") -> None:
    """A whole single-device state dict (e.g. gathered from shards) as float32 release weights.
    model_config.json is the model section, plus `"head": "score"` for a score model."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    write_safetensors(tensors, folder / WEIGHTS)
    io.write_json(folder / CONFIG, {**cfg.model_dump(mode="json"), **({"head": head} if head != "lm" else {})})


def _read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise MissingInput(f"{path}: no model config (did the stage finish?)")
    return json.loads(path.read_text())


def load_config(folder: Path) -> ModelSection:
    config = _read_config(folder)
    config.pop("head", None)
    return ModelSection.model_validate(config)


def load_head(folder: Path) -> str:
    """"lm" (a language model) or "score" (a reward model or critic)."""
    return _read_config(folder).get("head", "lm")


def verified(path: Path) -> Path:
    """A weights file checked against its stage's manifest first, when its folder has one: a
    truncated or flipped file stops here in one line naming it (never a half-read model)."""
    path = Path(path)
    return io.verify_listed(path.parent, path.name) if (path.parent / io.MANIFEST).is_file() else path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(verified(path)))


def load_release(folder: Path, device: str | torch.device = "cpu") -> Transformer:
    """The model saved in `folder`, in eval mode, float32, on `device`."""
    model = Transformer(load_config(folder), head=load_head(folder))
    model.load_state_dict(load_weights(Path(folder) / WEIGHTS), strict=True)
    return model.to(device).eval()
