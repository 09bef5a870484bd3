"""Training checkpoints: written to a hidden temporary folder, then renamed into place.

    checkpoints/step_0000100/
      model.safetensors     weights (tied tensors stored once)
      optimizer.pt          AdamW state; tensors and numbers only, read with weights_only=True
      rng.pt                torch (and CUDA) RNG states
      state.json            step, loader state, scheduler, guard state, metrics
      config.json           the resolved model and pretrain config
      files.json            sha256 of every file above, written last

A folder is complete when `files.json` exists and every hash matches; a killed writer leaves only
a dot-named temporary folder, which `latest` never picks and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmpipe import io
from llmpipe.model.release import write_safetensors

STEP_DIR = re.compile(r"^step_(\d{7})$")
FILES = "files.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's state dict as safetensors (contiguous copies on CPU), atomically."""
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path), device=str(next(model.parameters()).device))
    model.load_state_dict(state, strict=True)


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         config: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    io.write_json(tmp / "state.json", {**state, "step": step})
    io.write_json(tmp / "config.json", config)
    files = {p.name: io.sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    for path in tmp.iterdir():  # atomic_path fsyncs files it writes; torch.save'd ones too
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    io.write_json(tmp / FILES, files)
    if final.exists():  # a rerun that reached the same step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    io.fsync_dir(root)
    for old in complete_steps(root)[:-keep]:
        shutil.rmtree(step_dir(root, old))
    for stale in root.glob(".tmp-step_*"):  # leftovers of killed writers
        shutil.rmtree(stale, ignore_errors=True)
    return final


def complete_steps(root: Path) -> list[int]:
    """Steps with a finished checkpoint folder (files.json present), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / FILES).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def verify(path: Path) -> None:
    """Raise io.ChecksumError when a file of the checkpoint is missing or altered."""
    files = json.loads((Path(path) / FILES).read_text())
    for name, digest in files.items():
        if not (Path(path) / name).is_file():
            raise io.ChecksumError(f"{path / name}: listed in {FILES} but missing")
        io.verify_sha256(Path(path) / name, digest)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint whose hashes verify, or None."""
    for step in reversed(complete_steps(root)):
        path = step_dir(root, step)
        try:
            verify(path)
        except io.ChecksumError:
            continue
        return path
    return None


def newest(root: Path) -> Path | None:
    """The newest complete checkpoint folder, without re-hashing it (see `latest`)."""
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         verified: bool = False) -> dict:
    """Restore weights, optimizer and RNG states from checkpoint `path`; return its state.json.

    `verified`: the caller just checked the hashes (`latest` does), so they are not read twice.
    """
    path = Path(path)
    if not verified:
        verify(path)
    load_weights(model, path / "model.safetensors")
    device = next(model.parameters()).device
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())
