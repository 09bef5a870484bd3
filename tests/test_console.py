"""The quiet console: each stage thread's output goes to its own log, the terminal gets the rest."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, multiprocessing, subprocess, sys, threading
    from pathlib import Path
    from loguru import logger
    from llmpipe import console

    console.install(verbose=sys.argv[2] == "verbose")
    logs = Path(sys.argv[1])

    def child(name):
        print(f"{name} from a forked worker", flush=True)

    def stage(name):
        with console.stage_output(logs / f"{name}.log"):
            print(f"{name} printed")
            logging.getLogger("somelib").warning(f"{name} logged")
            logger.info(f"{name} via loguru")
            subprocess.run(["echo", f"{name} from a subprocess"], stdout=console.subprocess_output(), check=True)
            worker = multiprocessing.get_context("fork").Process(target=child, args=(name,))
            worker.start()
            worker.join()

    threads = [threading.Thread(target=stage, args=(name,)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    console.stage_line("left", "ran", 1.25, "documents=3")
    print("main printed")
""")


def _run(tmp_path, mode):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), mode], capture_output=True, text=True,
                          check=True)


def test_each_stage_thread_writes_its_own_log(tmp_path):
    result = _run(tmp_path, "quiet")
    assert result.stdout.splitlines() == ["left       ran in 1.2s  documents=3", "main printed"]
    assert result.stderr == ""
    for name, other in (("left", "right"), ("right", "left")):
        log = (tmp_path / f"{name}.log").read_text()
        for line in ("printed", "logged", "via loguru", "from a subprocess", "from a forked worker"):
            assert f"{name} {line}" in log
        assert other not in log


def test_verbose_shows_everything_and_still_logs(tmp_path):
    result = _run(tmp_path, "verbose")
    shown = result.stdout + result.stderr
    for name in ("left", "right"):
        for line in ("printed", "logged", "via loguru", "from a subprocess", "from a forked worker"):
            assert f"{name} {line}" in shown
        assert f"{name} printed" in (tmp_path / f"{name}.log").read_text()


def test_stage_line_counts_are_readable():
    from llmpipe.console import format_counts

    counts = {"documents": 1234567, "tokens_per_s": 11940.4, "val_loss": 5.23456, "mfu": float("nan"), "x": float("inf")}
    assert format_counts(counts, ("documents", "tokens_per_s", "val_loss", "mfu", "x", "absent")) == \
        "documents=1,234,567 tokens_per_s=11,940 val_loss=5.235 mfu=nan x=inf"
