"""What a stage function receives besides its config sections: a module of its own, so that the
stage modules, the executor (`llmpipe.stages`) and the torchrun launcher all import it without
importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmpipe.paths import RunDir
from llmpipe.tracking import NullTracker, Tracker


@dataclass
class StageContext:
    """What a stage function gets besides its own config sections."""

    name: str
    run_dir: RunDir
    out_dir: Path  # the stage's folder; it is empty unless a resumable run left state here
    seed: int
    inputs: dict[str, Path | list[Path]] = field(default_factory=dict)  # input name -> folder, file or files to read
    tracker: Tracker = field(default_factory=NullTracker)
    run_name: str = ""  # run.name: what the run's registered model is called after


def encode_inputs(inputs: dict[str, Path | list[Path]]) -> dict[str, str | list[str]]:
    """`StageContext.inputs` as JSON (a worker's job file)."""
    return {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in inputs.items()}


def decode_inputs(inputs: dict[str, str | list[str]]) -> dict[str, Path | list[Path]]:
    return {k: [Path(p) for p in v] if isinstance(v, list) else Path(v) for k, v in inputs.items()}


def as_paths(value: Path | list[Path]) -> list[Path]:
    """An input that may be one path (an upstream file) or several (the config's list)."""
    return list(value) if isinstance(value, list) else [Path(value)]
