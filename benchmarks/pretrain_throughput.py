"""Training throughput of the transformer: tokens/s, achieved FLOP/s, MFU and peak memory.

    python benchmarks/pretrain_throughput.py                      # tiny and ~25M, eager and compiled
    python benchmarks/pretrain_throughput.py --models gpt2-124m --modes compiled   # on a GPU

Each case runs in its own process (so peak memory is that case's alone): full training steps
(forward, backward, clip, AdamW) on random tokens, after warm-up steps that absorb compilation;
tokens/s is from the median step time (other processes may share the cores: the best step is
printed too).
MFU is achieved FLOP/s (PaLM counting, `flops_per_token`) over the peak: on CPU the measured
FLOP/s of a large fp32 matmul on the same threads, on GPU the vendor's dense bf16 figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (model section, micro batch on CPU, micro batch on GPU)
MODELS = {
    "tiny": ("configs/tiny.yaml", 16, 64),
    "25m": (dict(vocab_size=10_000, d_model=512, n_layers=6, n_heads=8, d_ff=1408, seq_len=256), 8, 64),
    "gpt2-124m": ("configs/gpt2-124m.yaml", 2, 32),
}


def model_section(name: str):
    from llmpipe.config import ModelSection, load

    spec = MODELS[name][0]
    return load(ROOT / spec).model if isinstance(spec, str) else ModelSection(**spec)


def run_case(name: str, mode: str, steps: int, warmup: int, device_name: str, dtype_name: str, batch: int | None) -> dict:
    import torch

    from llmpipe.config import PretrainSection
    from llmpipe.model import Transformer, flops_per_token, parameter_count
    from llmpipe.training.optim import build_optimizer
    from llmpipe.training.trainer import autocast, autocast_dtype, peak_flops, peak_memory_mb, resolve_device

    cfg = model_section(name)
    device = resolve_device(device_name)
    dtype = autocast_dtype(dtype_name, device)
    B = batch or MODELS[name][1 if device.type == "cpu" else 2]
    T = cfg.seq_len
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    optimizer = build_optimizer(model, PretrainSection(), fused=device.type == "cuda")
    forward = torch.compile(model) if mode == "compiled" else model
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with autocast(device, dtype):
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    peak = peak_flops(device, dtype)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step().item()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cpu":  # other processes share these cores: keep the best of two peak readings
        peak = max(peak, peak_flops(device, dtype))
    tps = B * T / statistics.median(times)
    fpt = flops_per_token(cfg)
    return {"model": name, "mode": mode, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(dtype or torch.float32).removeprefix("torch."), "threads": torch.get_num_threads(),
            "params_M": parameter_count(cfg) / 1e6, "batch": f"{B}x{T}", "tokens_per_s": tps,
            "tflops": tps * fpt / 1e12, "peak_tflops": peak / 1e12, "mfu": tps * fpt / peak,
            "peak_mem_mb": peak_memory_mb(device), "warmup_s": warm_s,
            "best_tokens_per_s": B * T / min(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,25m", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch", type=int, help="micro batch (sequences); default per model and device")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)

    if args.one:
        name, mode = args.one.split(":")
        print(json.dumps(run_case(name, mode, args.steps, args.warmup, args.device, args.dtype, args.batch)))
        return 0

    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--one", f"{name}:{mode}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} {mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['model']:>9} {r['mode']:>8} {r['device']} {r['dtype']:>8} params {r['params_M']:6.1f}M "
                  f"batch {r['batch']:>7}  {r['tokens_per_s']:>10,.0f} tok/s  {r['tflops'] * 1e3:8.1f} GFLOP/s  "
                  f"MFU {r['mfu']:6.1%} (peak {r['peak_tflops'] * 1e3:,.0f} GFLOP/s)  "
                  f"peak mem {r['peak_mem_mb']:,.0f} MB  warm-up {r['warmup_s']:.1f}s  "
                  f"(best step {r['best_tokens_per_s']:,.0f} tok/s)", flush=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
