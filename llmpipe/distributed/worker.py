"""What each torchrun worker runs: `python -m llmpipe.distributed.worker <stage>/.launch/job.json`.

A worker rebuilds the stage's context from the job file alone (the config is validated again)
and runs the stage's in-process function, which joins torchrun's process group (the trainer's
`env.init_distributed`). Rank 0 logs to the stage's
MLflow run through a file the parent replays into it (the parent created the run and ends it);
the other ranks get the null tracker. Each rank writes its result to `result-rank<N>.json`, or, when it crashes, one line
about the error with the time to `error-rank<N>.json`, which the parent reads.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from llmpipe import io
from llmpipe.config import validate
from llmpipe.context import StageContext, decode_inputs
from llmpipe.distributed import env
from llmpipe.distributed.launch import LaunchFiles
from llmpipe.paths import RunDir
from llmpipe.stages import STAGES
from llmpipe.supervise import die_with_parent
from llmpipe.tracking import FileTracker, NullTracker, Tracker


def tracker_for_rank(rank: int, tracking: dict) -> Tracker:
    if rank == 0 and tracking["run_id"]:
        return FileTracker(tracking["file"], os.environ.get("MLFLOW_TRACKING_URI"), tracking["run_id"])
    return NullTracker()


def run_job(job: dict, rank: int) -> dict:
    config = validate(job["config"])
    stage = STAGES[job["stage"]]
    tracker = tracker_for_rank(rank, job["tracking"])
    ctx = StageContext(name=stage.name, run_dir=RunDir(config.run_dir), out_dir=Path(job["out_dir"]),
                       seed=config.run.seed, inputs=decode_inputs(job["inputs"]), tracker=tracker,
                       run_name=config.run.name)
    try:
        result = stage.function()(ctx, *[config.section(name) for name in stage.sections]) or {}
    finally:
        tracker.close()  # the run stays open: the parent ends it
    env.destroy()  # not after a failure: a peer may be stuck in a collective with us
    return result


def main(job_path: str) -> None:
    die_with_parent(signal.SIGKILL)  # torchrun gone without stopping us: nobody is left to coordinate
    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ["RANK"])
    files = LaunchFiles.of(Path(job["out_dir"]))
    try:
        result = run_job(job, rank)
    except Exception as err:
        io.write_json(files.error(rank), {"rank": rank, "error": f"{type(err).__name__}: {err}".splitlines()[0],
                                          "errno": getattr(err, "errno", None), "time": time.time()})
        # Exit now, without interpreter finalization: the process group is still up (a peer may
        # be in a collective with us, so it is not destroyed), and gloo's threads freed during
        # finalization abort the process, turning a clear error into a SIGABRT.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    io.write_json(files.result(rank), result)


if __name__ == "__main__":
    main(sys.argv[1])
