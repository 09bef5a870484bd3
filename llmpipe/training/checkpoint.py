"""Training checkpoints: written to a hidden temporary folder by every rank, then renamed into place.

    checkpoints/step_0000100/
      .metadata             DCP's index: which file holds which piece of which tensor
      __<rank>_0.distcp     model and optimizer tensors, one file per writing rank (DCP)
      rng.pt                torch (and CUDA) RNG states of rank 0
      state.json            step, loader state, scheduler, guard state, metrics
      config.json           the resolved model and training config
      files.json            sha256 of every file above, written last

Model and optimizer states are keyed by parameter name (llmpipe/distributed/checkpoint.py), so a
checkpoint saved by N ranks under one strategy resumes on M ranks under another, and on one
process without a process group. A folder is complete when `files.json` exists and every hash
matches; a killed writer leaves only a dot-named temporary folder, which `latest` never picks
and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from llmpipe import io
from llmpipe.distributed import env
from llmpipe.distributed.checkpoint import load_sharded, save_sharded
from llmpipe.faults import fault_point

STEP_DIR = re.compile(r"^step_(\d{7})$")
FILES = "files.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def save(root: Path, step: int, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
         state: dict, config: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep` (collective:
    every rank calls it; rank 0 writes the small files, hashes and renames)."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"  # the same name on every rank
    if env.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    env.barrier()
    save_sharded(tmp, parts, optimizers)
    fault_point("checkpoint", f"writing_step_{step}")  # LLMPIPE_FAULT: killed with this rank's shards written
    if env.is_main():
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        io.write_json(tmp / "state.json", {**state, "step": step})
        io.write_json(tmp / "config.json", config)
    env.barrier()  # every rank's shards are on disk
    if env.is_main():
        files = {p.name: io.sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        for path in tmp.iterdir():  # DCP and torch.save do not fsync
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
    env.barrier()  # nobody reads the checkpoint before it is in place
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


def load(path: Path, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer] | None = None,
         verified: bool = False) -> dict:
    """Restore model, optimizer and RNG states from checkpoint `path`; return its state.json.

    `verified`: the caller just checked the hashes (`latest` does), so they are not read twice.
    """
    path = Path(path)
    if not verified:
        verify(path)
    load_sharded(path, parts, optimizers)
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())
