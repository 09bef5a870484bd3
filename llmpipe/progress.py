"""Progress bars for long stages: shown on a terminal, silent in logs, CI and non-zero ranks."""

from __future__ import annotations

from tqdm.auto import tqdm

from llmpipe import console


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             enabled: bool = True) -> tqdm:
    # the terminal, not the stage's log; disable=None: tqdm turns itself off when that is not a terminal
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=None if enabled else True,
                file=console.terminal(),
                dynamic_ncols=True, mininterval=0.5, leave=False)
