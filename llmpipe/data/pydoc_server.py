"""A local documentation website to crawl: `python -m pydoc -p 0` bound to 127.0.0.1.

Every machine with Python has it: real HTML, a real link graph (module index -> modules ->
submodules, keywords and topics). The server is a child process that is always stopped when
the `with` block ends, on success or on error.

Known behaviour (probed): pydoc quits at once when stdin is not a terminal and reaches EOF, so
stdin stays an open pipe; it imports a module when its page is requested, so modules with side
effects (the regression test suite, GUI demos) are excluded on the crawl side by URL; it serves
one request at a time (about 8 pages/s).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

_READY = re.compile(r"Server ready at (http://\S+)")


@contextlib.contextmanager
def pydoc_server(port: int = 0, site_packages: bool = False, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Start pydoc's HTTP server on 127.0.0.1 and yield its base URL (`http://127.0.0.1:PORT/`).

    `site_packages=False` runs Python with `-S`: only the standard library is documented, the
    same few thousand pages on every machine, and no heavy third-party imports inside the server.
    """
    flags = ["-I"] + ([] if site_packages else ["-S"])  # -I: no cwd/user site on sys.path
    cmd = [sys.executable, *flags, "-m", "pydoc", "-n", "127.0.0.1", "-p", str(port)]
    with tempfile.TemporaryDirectory(prefix="llmpipe-pydoc-") as cwd:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        try:
            yield _wait_ready(proc, start_timeout_s)
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pydoc server exited before it was ready (exit code {proc.poll()})")
        if match := _READY.search(line):
            url = match.group(1)
            return url if url.endswith("/") else url + "/"
    raise RuntimeError(f"pydoc server not ready after {timeout_s:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    """Ask pydoc to quit, then terminate, then kill its whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write("q\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError, ValueError):
            stream.close()


def exclusion_patterns(modules: list[str]) -> list[str]:
    """URL regexes for pydoc pages (and subpackage pages) of `modules`, plus the search and get forms."""
    patterns = [r"/search\?", r"/get\?"]
    if modules:
        names = "|".join(re.escape(m) for m in modules)
        patterns.append(rf"^https?://[^/]+/(?:{names})(?:\.[^/?#]*)?\.html$")
    return patterns
