"""The launch boundary: a training stage with `nproc > 1` runs as `torchrun` workers.

The stage process (the parent, under Prefect or the CLI) stays where it is: it has prepared the
stage folder and opened the stage's MLflow run, and it writes the manifest afterwards. In
between it hands the work to `torchrun --standalone --nproc-per-node N -m llmpipe.distributed.worker`:

  * everything a worker needs is in `<stage>/.launch/job.json` (the stage name, the resolved
    config, the stage folder, the MLflow run id), never a pickled context; the store's URI,
    which may carry a password, comes by the environment (`MLFLOW_TRACKING_URI`);
  * torchrun's output is streamed line by line to `on_line` (stdout by default, so it lands in
    whatever log the stage's output goes to);
  * torchrun runs in a process group of its own that gets SIGTERM when the parent dies or is
    interrupted (`llmpipe.supervise`), and torchrun passes that on to its workers;
  * a failed job raises `WorkerFailed` with one line: the first worker error, by time;
  * rank 0's tracking calls come back through `.launch/tracking.jsonl`, replayed into the stage's
    MLflow run while the job runs;
  * rank 0 writes the stage function's result to `.launch/result-rank0.json`, which becomes
    the stage's counts.

On several nodes (`nnodes > 1`) the same job file is run by one torchrun per node: submitted as
`sbatch --wait scripts/slurm/pretrain.sbatch JOB_FILE` (`launcher: slurm`), or by whoever runs the
command the stage prints (`launcher: torchrun`), while the stage waits for rank 0's result.

Dot-named files are bookkeeping: the manifest leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmpipe import console, io
from llmpipe.config import RunConfig
from llmpipe.context import StageContext, encode_inputs
from llmpipe.errors import UserError
from llmpipe.supervise import supervised
from llmpipe.tracking import Replay

LAUNCH_DIR = ".launch"
WORKER_MODULE = "llmpipe.distributed.worker"
TAIL_LINES = 200  # output kept to explain a failure that left no error record
# one failed worker in torchrun's summary of a failed job: "rank      : 1 (local_rank: 1)\n  exitcode  : -9 ..."
_WORKER_EXIT = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: \d+\)\n\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)


class WorkerFailed(UserError):
    """A torchrun worker failed; the message names its rank and its error in one line."""

    errno: int | None = None  # a worker's OSError number (out of disk space, say)


@dataclass(frozen=True)
class LaunchFiles:
    """The files parent and workers exchange, in `<stage>/.launch/`."""

    root: Path

    @classmethod
    def of(cls, out_dir: Path) -> "LaunchFiles":
        return cls(Path(out_dir) / LAUNCH_DIR)

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def tracking(self) -> Path:
        """Rank 0's tracking calls, replayed into the stage's MLflow run (`llmpipe.tracking.FileTracker`)."""
        return self.root / "tracking.jsonl"

    def result(self, rank: int) -> Path:
        return self.root / f"result-rank{rank}.json"

    def error(self, rank: int) -> Path:
        return self.root / f"error-rank{rank}.json"

    def errors(self) -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted(self.root.glob("error-rank*.json"))]


def torchrun_command(job: Path, nproc: int) -> list[str]:
    """`torchrun` through this interpreter; `--standalone` picks a free port, so jobs never clash.
    One process needs no rendezvous: the worker is started directly, as rank 0 of 1."""
    if nproc == 1:
        return [sys.executable, "-m", WORKER_MODULE, str(job)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", WORKER_MODULE, str(job)]


SBATCH_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "pretrain.sbatch"


def multinode_torchrun_command(job: Path, nproc: int, nnodes: int, endpoint: str, rdzv_id: str) -> list[str]:
    """What each of `nnodes` nodes runs: one torchrun that meets the others at the c10d rendezvous `endpoint`."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            "-m", WORKER_MODULE, str(job)]


def sbatch_command(job: Path, nnodes: int, log_dir: Path) -> list[str]:
    """`sbatch --wait` of the pretrain script: it returns when the job ends, with the job's exit code."""
    return ["sbatch", "--wait", f"--nodes={nnodes}", f"--output={log_dir / 'slurm-%j.out'}", str(SBATCH_SCRIPT), str(job)]


def worker_env(nproc: int, tracking_uri: str | None = None) -> dict[str, str]:
    """Unbuffered output, so lines arrive as they are printed; the cores shared out between workers;
    the MLflow store by the environment, never in a file (its URI may carry a password)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # the thread count fixed even when other stages load the cores: MKL's default lets it use fewer
    # threads on a busy machine, which changes how a matmul's sums are split (suspected, not yet
    # proven, cause of a tiny-demo pretraining that differed from its rerun in the 7th digit)
    env.setdefault("MKL_DYNAMIC", "FALSE")
    env.setdefault("OMP_DYNAMIC", "FALSE")
    return env


def run_workers(ctx: StageContext, config: RunConfig, nproc: int, on_line: Callable[[str], None] = print,
                nnodes: int = 1, launcher: str = "torchrun", rdzv_endpoint: str | None = None) -> dict:
    """Run the stage's function in `nproc` torchrun workers (on each of `nnodes` nodes); return rank 0's result.

    One node: `torchrun --standalone` here. Several: `launcher` slurm submits the sbatch script and
    waits for it; torchrun prints the command each node runs and waits for the workers' result."""
    files = LaunchFiles.of(ctx.out_dir)
    shutil.rmtree(files.root, ignore_errors=True)  # an earlier attempt's errors are not this one's
    io.write_json(files.job, {"stage": ctx.name, "config": config.model_dump(mode="json"),
                              "out_dir": str(ctx.out_dir), "inputs": encode_inputs(ctx.inputs),
                              "tracking": {"run_id": ctx.tracker.run_id, "file": str(files.tracking)}})
    env = worker_env(nproc, ctx.tracker.uri)
    if nnodes > 1 and launcher == "torchrun":
        with Replay(files.tracking, ctx.tracker):
            return _wait_for_nodes(ctx, files, nproc, nnodes, rdzv_endpoint or f"{socket.getfqdn()}:29500")
    if nnodes > 1:
        command = sbatch_command(files.job, nnodes, files.root)
        env.update(GPUS_PER_NODE=str(nproc), VENV=env.get("VENV", sys.prefix))
    else:
        command = torchrun_command(files.job, nproc)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with Replay(files.tracking, ctx.tracker), \
            supervised(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace", env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        code = proc.wait()
    if code != 0:
        failure = WorkerFailed(f"{ctx.name}: {describe_failure(files, code, list(tail), command[0])}")
        failure.errno = next((error["errno"] for error in files.errors() if error.get("errno")), None)
        raise failure
    return json.loads(files.result(0).read_text())


def _wait_for_nodes(ctx: StageContext, files: LaunchFiles, nproc: int, nnodes: int, endpoint: str,
                    poll_s: float = 1.0) -> dict:
    """Say what to run on each node, then wait until rank 0 has written its result, or a worker its error."""
    command = multinode_torchrun_command(files.job, nproc, nnodes, endpoint, f"llmpipe-{ctx.name}-{os.getpid()}")
    console.say(f"{ctx.name:<10} waiting for {nnodes} nodes: run on each (the run directory shared, the same venv):")
    console.say("  " + shlex.join(command))
    while not files.result(0).is_file():
        if files.errors():
            failure = WorkerFailed(f"{ctx.name}: {describe_failure(files, 1, [])}")
            failure.errno = next((error["errno"] for error in files.errors() if error.get("errno")), None)
            raise failure
        time.sleep(poll_s)
    return json.loads(files.result(0).read_text())


def describe_failure(files: LaunchFiles, code: int, tail: list[str], launcher: str = "torchrun") -> str:
    """One line: a worker killed by a signal (torchrun's summary names it), else the first error a
    worker recorded, else torchrun's last words.

    A killed worker records nothing, and the peers it leaves in a collective fail after it with
    connection errors of their own, so a signal outranks every record. Only torchrun sends
    SIGTERM (to the survivors), so that one is never the cause. Among records, the workers'
    sub-second times decide: the crashing rank writes its record before it exits (torch's own
    error files have whole seconds, and the culprit and a peer's broken collective often tie).
    """
    killed = [(rank, exit_code) for rank, exit_code in _worker_exits("\n".join(tail))
              if exit_code < 0 and exit_code != -signal.SIGTERM]
    if killed:
        rank, exit_code = killed[0]
        return f"worker rank {rank} failed: {_exit_reason(exit_code)}"
    errors = files.errors()
    if errors:
        first = min(errors, key=lambda error: error["time"])
        return f"worker rank {first['rank']} failed: {first['error']}"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
    launcher = "torchrun" if launcher == sys.executable else launcher
    return f"{launcher} failed ({_exit_reason(code)}): {last}"


def _worker_exits(output: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each failed worker in torchrun's failure summary."""
    return [(int(rank), int(code)) for rank, code in _WORKER_EXIT.findall(output)]


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
