"""Running one stage from a command line, without Prefect: what `llmpipe STAGE ...` and every stage
module's `python -m` share.

    python -m llmpipe.alignment.sft --config configs/tiny.yaml [--run-dir DIR] [--set k=v]... [--nproc N]

A module of its own so that the stage modules reach it without importing the CLI (which imports
every stage's module to build its parser). Errors that are the user's to fix print one line and
exit 2; a failed stage prints one line (its traceback is in its log) and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from llmpipe import config as configlib
from llmpipe import console
from llmpipe.errors import UserError
from llmpipe.stages import STAGES, StagesFailed

EXIT_USER_ERROR = 2
EXIT_STAGE_FAILED = 1


def add_config_args(parser: argparse.ArgumentParser, run_dir_required: bool = False) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (parsed as YAML); repeatable")
    parser.add_argument("--run-dir", type=Path, required=run_dir_required,
                        help="run directory (default: runs/<run.name>)")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show everything stages print and log (default: a line per stage; the rest is in "
                             "runs/<name>/logs/<stage>.log)")


def training_section(stage: str) -> str | None:
    """The stage's training section (a TrainSection: nproc, parallel), if it is a training stage."""
    fields = configlib.RunConfig.model_fields
    return next((s for s in STAGES[stage].sections if issubclass(fields[s].annotation, configlib.TrainSection)), None)


def add_stage_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The arguments of `llmpipe NAME` and of NAME's `python -m`."""
    add_config_args(parser)
    section = training_section(name)
    if section:
        parser.add_argument("--nproc", type=int, metavar="N",
                            help=f"processes on this node (torchrun workers when > 1); as --set {section}.nproc=N")
        parser.set_defaults(training_section=section)
    add_verbose(parser)
    parser.set_defaults(command=name)


def load_config(args: argparse.Namespace) -> configlib.RunConfig:
    overrides = list(args.overrides)
    if getattr(args, "nproc", None) is not None:
        overrides.append(f"{args.training_section}.nproc={args.nproc}")
    return configlib.load(args.config, overrides, args.run_dir)


def quiet_library_consoles(verbose: bool) -> None:
    """Prefect's own log lines go to its API (the UI shows them), MLflow's info lines nowhere; on
    the terminal only with --verbose. Set before either is imported: both read these at import."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # where MLflow was imported already (in-process callers)


def run_stage(args: argparse.Namespace) -> int:
    """One stage (`args.command`) in this process, tracked as an MLflow run of its own."""
    from llmpipe import stages, tracking
    from llmpipe.locks import run_lock

    config = load_config(args)
    quiet_library_consoles(args.verbose)
    console.install(args.verbose)
    with run_lock(config.run_dir):
        uri = tracking.tracking_uri(config.run_dir.parent)
        experiment = tracking.init_store(uri, config.run_dir.parent)
        tracker = tracking.MlflowTracker(uri, experiment, run_name=args.command,
                                         tags={"llmpipe.stage": args.command, "llmpipe.run": config.run.name})
        try:
            stages.execute(args.command, config, tracker)
        except BaseException:
            tracker.close("FAILED")
            raise
        tracker.close()
    print(f"outputs: {config.run_dir / args.command}")
    return 0


def handle_errors(command: str, handler: Callable[[], int]) -> int:
    """`handler()`, a user's error or a failed stage turned into one line on stderr and an exit code."""
    try:
        return handler()
    except UserError as err:
        print(f"llmpipe {command}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StagesFailed as err:
        print(f"llmpipe {command}: {err}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt:
        print(f"llmpipe {command}: interrupted", file=sys.stderr)
        return 130


def stage_main(name: str, argv: list[str] | None = None) -> None:
    """Entry point of `python -m <stage module>`: the same as `llmpipe <name> ...`."""
    parser = argparse.ArgumentParser(prog=f"python -m {STAGES[name].target.partition(':')[0]}", description=f"run the {name} stage alone")
    add_stage_args(parser, name)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sys.exit(handle_errors(name, lambda: run_stage(args)))
