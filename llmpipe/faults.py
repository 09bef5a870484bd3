"""Fault injection for tests: make a chosen process fail at a chosen point, like a real crash.

    LLMPIPE_FAULT=shard:before_manifest               SIGKILL the shard stage before its manifest
    LLMPIPE_FAULT=pretrain:step_3@rank1:raise         rank 1 of pretrain raises at step 3
    LLMPIPE_FAULT=pretrain:step_3@rank1:raise,shard:before_manifest   several faults
    LLMPIPE_FAULT=write:train_00001.arrow             SIGKILL a file's writer after fsync, before its rename

A fault is `stage:point[@rankN][:kill|raise]`. `kill` (the default) is SIGKILL, which nothing can
clean up after; `raise` is a `RuntimeError("injected fault at step 3")`, an ordinary crash with a
traceback. Without `@rankN` every process fires. The rank is torchrun's `RANK` (0 outside torchrun).
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

ENV = "LLMPIPE_FAULT"
_FAULT = re.compile(r"^(?P<stage>[\w-]+):(?P<point>[\w.-]+)(?:@rank(?P<rank>\d+))?(?::(?P<action>kill|raise))?$")


@dataclass(frozen=True)
class Fault:
    stage: str
    point: str
    rank: int | None = None  # None: every rank
    action: str = "kill"


def parse(spec: str) -> list[Fault]:
    """`LLMPIPE_FAULT`'s value as faults; a malformed entry raises, so a typo never passes silently."""
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        match = _FAULT.match(entry)
        if match is None:
            raise ValueError(f"{ENV}={spec!r}: {entry!r} is not stage:point[@rankN][:kill|raise]")
        rank = match["rank"]
        faults.append(Fault(match["stage"], match["point"], int(rank) if rank is not None else None,
                            match["action"] or "kill"))
    return faults


def fault_point(stage: str, point: str) -> None:
    """Fail here if `LLMPIPE_FAULT` names this stage, point and rank; otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    for fault in parse(spec):
        if (fault.stage, fault.point) == (stage, point) and fault.rank in (None, rank):
            if fault.action == "raise":
                raise RuntimeError(f"injected fault at {point.replace('_', ' ')}")
            os.kill(os.getpid(), signal.SIGKILL)
