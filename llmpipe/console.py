"""What the terminal shows: a line when a stage starts, a line when it ends, progress bars.
Everything else a stage prints or logs goes to its log file (`RunDir.stage_log`).

Stages of independent branches run in worker threads of one process, so redirecting file
descriptors cannot tell two of them apart. Instead `sys.stdout` and `sys.stderr` become
dispatchers that write to the log of the stage running on the current thread, and to the
terminal outside any stage. Python `logging` records and loguru messages (datatrove) take the
same path; forked workers (datatrove's local executor) inherit the thread's log; a subprocess a
stage starts gets the log file as its output (`subprocess_output()`). `verbose` copies
everything to the terminal too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import threading
from pathlib import Path
from typing import IO, Iterator

_current = threading.local()  # .log: the open log file of the stage running on this thread
_settings = {"verbose": False}
_terminal: dict[str, IO[str]] = {}  # the real streams, saved by install()


def _stage_log() -> IO[str] | None:
    return getattr(_current, "log", None)


class _Dispatcher(io.TextIOBase):
    """A stand-in for sys.stdout / sys.stderr that writes to the current thread's stage log."""

    def __init__(self, terminal: IO[str]):
        self.terminal = terminal

    def write(self, text: str) -> int:
        log = _stage_log()
        if log is None or _settings["verbose"]:
            self.terminal.write(text)
        if log is not None:
            log.write(text)
        return len(text)

    def flush(self) -> None:
        log = _stage_log()
        if log is not None:
            log.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return _stage_log() is None and self.terminal.isatty()

    def fileno(self) -> int:
        log = _stage_log()
        return log.fileno() if log is not None else self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8")


class _StageRecords(logging.Filter):
    """On the terminal's logging handlers: records from a stage's thread go to its log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        log = _stage_log()
        if log is None:
            return True
        log.write(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record) + "\n")
        return _settings["verbose"]


def install(verbose: bool = False) -> None:
    """Route output by thread from now on (idempotent). Call once, before stages run."""
    _settings["verbose"] = verbose
    _dispatch()
    route_logging()


def _dispatch() -> None:
    if _terminal:
        return
    _terminal.update(stdout=sys.stdout, stderr=sys.stderr)
    sys.stdout, sys.stderr = _Dispatcher(sys.stdout), _Dispatcher(sys.stderr)
    with contextlib.suppress(ImportError):  # datatrove logs with loguru; its default sink held the old stderr
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="INFO")


def route_logging() -> None:
    """Put the thread filter on every handler of the root logger (again after a library configures logging)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _StageRecords) for f in handler.filters):
            handler.addFilter(_StageRecords())


def terminal() -> IO[str]:
    """The real stderr, for progress bars: they stay on the terminal while a stage's text goes to its log."""
    return _terminal.get("stderr", sys.stderr)


def say(line: str) -> None:
    """One line on the terminal, whichever thread says it."""
    stream = _terminal.get("stdout", sys.stdout)
    stream.write(line + "\n")
    stream.flush()


@contextlib.contextmanager
def stage_output(path: Path) -> Iterator[IO[str]]:
    """Send this thread's output (and that of workers it forks) to the log at `path`, appended."""
    install(_settings["verbose"])  # also where no command did: flow runs that a deployment starts
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _stage_log()
    with open(path, "a", buffering=1, encoding="utf-8") as log:
        _current.log = log
        try:
            yield log
        finally:
            _current.log = previous


def stage_line(name: str, status: str, seconds: float | None = None, details: str = "") -> None:
    """The line a stage gets on the terminal when it starts or ends."""
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    say(f"{name:<10} {status}{took}{'  ' + details if details else ''}")


def subprocess_output() -> IO[str] | None:
    """The stdout/stderr to give a subprocess the current stage starts: its log (None: inherit the terminal)."""
    return None if _settings["verbose"] else _stage_log()


def format_counts(counts: dict, keys: tuple[str, ...]) -> str:
    """`key=value` for the keys present: whole numbers and floats from 1,000 up with thousands
    separators (11,940, not 1.194e+04), smaller floats to 4 figures."""
    shown = []
    for key in keys:
        if key in counts:
            value = counts[key]
            whole = math.isfinite(value) and (float(value).is_integer() or abs(value) >= 1000)
            shown.append(f"{key}={round(value):,}" if whole else f"{key}={value:.4g}")
    return " ".join(shown)
