"""Child processes that never outlive the stage that started them.

The crawl's Scrapy process and a training stage's torchrun job are started the same way: in a
process group of their own, with the kernel sending them a signal when the stage process dies
(Linux `PR_SET_PDEATHSIG`, so even a SIGKILLed stage leaves nothing running), and stopped on the
way out of the `with` block if they are still running (an exception, KeyboardInterrupt, a timeout).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Iterator

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere a no-op).

    The signal follows the parent *thread*: start the child from the thread that waits for it.
    """
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


@contextlib.contextmanager
def supervised(command: list[str], grace_s: float = 30.0, **popen_kwargs) -> Iterator[subprocess.Popen]:
    """Start `command` in its own process group and yield it; on leaving the block, a group still
    running gets SIGTERM (a graceful stop: Scrapy closes its WARC, torchrun stops its workers),
    then SIGKILL after `grace_s`."""
    proc = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent, **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
