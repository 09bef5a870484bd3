"""Shared fixtures: a small corpus made on this machine, and orchestration settings.

Prefect runs for real (its embedded API, with its SQLite database under the project, created
once and reused), and MLflow writes a real SQLite store inside each test's run directory (a copy of an empty one
MLflow made and migrated at the suite's first use: `LLMPIPE_MLFLOW_TEMPLATES`).
"""

from __future__ import annotations

import os
import pydoc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Before anything imports prefect: the embedded API under the project, patient on 2 cores.
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # its shutdown message races pytest closing stderr
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use the SQLite store inside their tmp dirs
# ...each a copy of one empty store MLflow migrated once (llmpipe.tracking): ~1.5 s less per store
os.environ.setdefault("LLMPIPE_MLFLOW_TEMPLATES", str(ROOT / ".pytest_cache" / "mlflow-templates"))

CORPUS_MODULES = ["json", "textwrap", "argparse", "shutil", "pathlib", "heapq", "bisect", "csv",
                  "string", "fractions", "statistics", "dataclasses", "functools", "itertools", "collections"]


def write_corpus(folder: Path, modules=CORPUS_MODULES) -> Path:
    """One plain-text document per stdlib module: the text `pydoc` renders for it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in modules:
        text = pydoc.render_doc(__import__(name), renderer=pydoc.plaintext)
        (folder / f"{name}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _console_streams_of_this_test():
    """A test that runs the CLI in-process has llmpipe's console take the streams it finds (capsys's,
    which close with the test): the next test's CLI then takes its own, whatever the test order."""
    from llmpipe import console

    before = dict(console._terminal)
    yield
    console._terminal.clear()
    console._terminal.update(before)
