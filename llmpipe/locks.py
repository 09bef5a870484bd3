"""Exclusive locks between processes: one run at a time on a run directory, one process at a time
creating a fresh MLflow SQLite store.

An `flock` on a file: the kernel drops it when its holder exits, however it exits, so a killed
run never leaves a lock held (a lock file may stay behind; it is only ever locked, never trusted
by its presence). On a cluster filesystem flock needs the mount's support (Lustre: `-o flock`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmpipe.errors import UserError
from llmpipe.paths import RunDir


class RunDirBusy(UserError):
    """Another process runs on this run directory."""


@contextmanager
def exclusive(path: Path, wait_s: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path`: wait for it (`wait_s=None`: as long as it takes), or yield
    False when it is still held by another process after `wait_s` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """This process alone writes `run_dir` (a flow, or a stage run alone): a second run started on
    it stops at once with one line saying who holds it, before it writes anything."""
    path = RunDir(run_dir).lock_file
    with exclusive(path, wait_s=0) as held:
        if not held:
            holder = path.read_text().strip() or "a process"
            raise RunDirBusy(f"{run_dir} is in use by another llmpipe run ({holder}); wait for it to end, "
                             f"or give this one another directory (--run-dir or run.run_dir)")
        yield
