"""Crash-safe file writes and checksums.

Every output that another stage or a resume reads is written to a temporary name in the same
folder, fsynced, then renamed: a killed process leaves either the old file or the new one,
never a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator

from llmpipe.errors import UserError
from llmpipe.faults import fault_point

_CHUNK = 1 << 20


class ChecksumError(UserError, IOError):
    """A file's bytes do not match the sha256 recorded when it was written."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    if not Path(path).is_file():
        raise ChecksumError(f"{path}: listed in its stage's manifest but missing{rebuild_hint(path)}")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"checksum mismatch in {path}: expected sha256 {expected[:12]}..., got {actual[:12]}..."
                            f"{rebuild_hint(path)}")


def rebuild_hint(path: str | Path) -> str:
    """How to rebuild a stage's file: its stage is the nearest folder above it with a manifest."""
    for folder in Path(path).parents:
        if (folder / MANIFEST).is_file():
            return f"; rebuild it with `llmpipe run ... --force {folder.name}`"
    return ""


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # stages run in threads too
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        fault_point("write", path.name)  # LLMPIPE_FAULT=write:<name>: killed with the file whole but unnamed
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.is_file():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


MANIFEST = "manifest.json"
MANIFEST_SEAL = "manifest_sha256"  # sha256 of the manifest's other fields: a hand edit shows


def sha256_json(obj) -> str:
    """sha256 of `obj`'s canonical JSON (sorted keys, no spaces): config hashes, cache keys, seals."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """A stage's manifest, sealed with the sha256 of its content, written last and atomically."""
    write_json(Path(folder) / MANIFEST, {**manifest, MANIFEST_SEAL: sha256_json(manifest)})


def read_manifest(folder: str | Path) -> dict:
    """The manifest in `folder`, checked against its seal: one edited by hand or cut short raises
    `ChecksumError` naming it and the command that rebuilds the stage. (A manifest without a
    seal, from an older llmpipe or a test's stand-in, is taken as it is.)"""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ChecksumError(f"{path} is not valid JSON (edited by hand, or cut short){rebuild_hint(path)}") from None
    if not isinstance(manifest, dict):
        raise ChecksumError(f"{path} is not a manifest (edited by hand?){rebuild_hint(path)}")
    seal = manifest.pop(MANIFEST_SEAL, None)
    if seal is not None and seal != sha256_json(manifest):
        raise ChecksumError(f"{path} was changed after its stage wrote it (its content does not match its "
                            f"sha256){rebuild_hint(path)}")
    return manifest


def verify_listed(folder: str | Path, name: str) -> Path:
    """`folder`/`name`, after checking its sha256 against the stage manifest in `folder` (the
    manifest is written last, so a file it lists was complete); raises `ChecksumError` otherwise."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    files = read_manifest(folder)["files"] if manifest.is_file() else {}
    if name not in files:
        raise ChecksumError(f"{folder / name} is not listed in {manifest}: its stage did not complete")
    if not (folder / name).is_file():
        raise ChecksumError(f"{folder / name}: listed in {manifest} but missing{rebuild_hint(folder / name)}")
    verify_sha256(folder / name, files[name]["sha256"])
    return folder / name
