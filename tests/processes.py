"""Process checks shared by the tests that start servers, crawlers and torchrun jobs."""

from __future__ import annotations

import os


def group_alive(pgid: int) -> bool:
    """True while any process of the process group `pgid` exists."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
