"""Toy stages for the flow's graph tests: they read their inputs, sleep a little, write a file."""

import os
import time

BRANCH_SECONDS = 1.5  # long enough that two branches running at once overlap for certain


def _write(ctx, text: str) -> dict:
    read = sorted(f"{name}={(path / 'out.txt').read_text()}" for name, path in ctx.inputs.items())
    (ctx.out_dir / "out.txt").write_text(f"{ctx.name}({text};{','.join(read)})")
    return {"inputs": len(read)}


def source(ctx, cfg):
    return _write(ctx, f"vocab {cfg.vocab_size}")


def branch(ctx, cfg):
    if os.environ.get("TOY_FAIL") == ctx.name:
        raise RuntimeError(f"{ctx.name} was told to fail")
    time.sleep(BRANCH_SECONDS)
    return _write(ctx, f"seq {cfg.seq_len}")
