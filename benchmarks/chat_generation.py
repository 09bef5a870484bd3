"""Generation speed: llmpipe's KV-cache `generate` against transformers' `generate` on the export.

    python benchmarks/chat_generation.py                       # tiny preset, batch 1 and 16, on CPU
    python benchmarks/chat_generation.py --device cuda --batches 1,16,64

The model is configs/tiny.yaml's (d_model 128, 6 layers, 8 heads, d_ff 256, seq_len 256, vocab
10k), randomly initialised (speed does not depend on the weights), saved as release weights
and exported with `llmpipe.export.export_weights`, so both sides run the same float32 weights.
Both decode greedily with their KV cache, the same prompts (random ids; at batch > 1 of
different lengths, left-padded with an attention mask for both), exactly `--new-tokens` new
tokens (no stop token for ours; transformers' end tokens unset, so neither stops early).

Each (implementation, batch) case runs in its own process, so its peak memory is its own:
`--warmup` untimed generations, then `--repeats` timed ones; tokens/s = batch x new tokens over
the fastest time (the least disturbed: on a shared machine other processes take the cores now
and then, which only ever adds time; the median is in brackets). `--rounds` runs every case
again, alternating ours and transformers, keeping each case's fastest. Peak memory on CPU is the
process's peak RSS (Python, torch and, for transformers, its import included) and, after `+`,
its growth during generation; on GPU, the peak allocated by torch. "same ids" says whether the
two produced the same tokens (float32 rounding can flip a near-tie in a random model's argmax).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPLS = ("llmpipe", "transformers")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def prompts(batch: int, length: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt ids (B, length), left-padded, and their mask: row 0 is `length` long, the
    others between length/2 and length (all `length` at batch 1)."""
    from llmpipe.tokenizer.special import PAD_ID

    g = torch.Generator().manual_seed(0)
    lengths = [length] + torch.randint(length // 2, length + 1, (batch - 1,), generator=g).tolist()
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, length - n:] = True
    return ids.masked_fill(~mask, PAD_ID).to(device), mask.to(device)


def build(impl: str, batch: int, prompt_len: int, new_tokens: int, device: torch.device, folder: Path):
    """A function running one whole generation and returning the new ids (B, new_tokens)."""
    from llmpipe.model.generate import generate
    from llmpipe.model.release import load_release
    from llmpipe.tokenizer.special import PAD_ID

    if impl == "llmpipe":
        model = load_release(folder / "release", device)
        ids, mask = prompts(batch, prompt_len, model.cfg.vocab_size, device)
        padded = bool((~mask).any())  # at batch 1 there is no padding: plain causal attention, no mask

        def run() -> torch.Tensor:
            return generate(model, ids, new_tokens, temperature=0, prompt_mask=mask if padded else None,
                            pad_id=PAD_ID, use_cache=True)
        return run, {}

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder / "hf", local_files_only=True, dtype=torch.float32).to(device).eval()
    hf.generation_config.eos_token_id = None  # no early stop: exactly new_tokens, as ours
    ids, mask = prompts(batch, prompt_len, hf.config.vocab_size, device)

    @torch.no_grad()
    def run() -> torch.Tensor:
        out = hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, use_cache=True, pad_token_id=PAD_ID)
        return out[:, ids.shape[1]:]
    return run, {"attention": hf.config._attn_implementation}


def run_case(impl: str, batch: int, args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    run, facts = build(impl, batch, args.prompt_len, args.new_tokens, device, Path(args.folder))

    def timed() -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        new = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, new

    before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        timed()
    times, new = [], None
    for _ in range(args.repeats):
        seconds, new = timed()
        times.append(seconds)
    if new.shape != (batch, args.new_tokens):
        raise AssertionError(f"{impl} made {tuple(new.shape)} ids, expected {(batch, args.new_tokens)}")
    memory = (f"{torch.cuda.max_memory_allocated() / 2**20:,.0f}MB" if device.type == "cuda"
              else f"{peak_rss_mb():,.0f}+{max(peak_rss_mb() - before, 0):,.0f}MB")
    return {"impl": impl, "batch": batch, "seconds": min(times), "median": statistics.median(times),
            "tokens_per_s": batch * args.new_tokens / min(times), "memory": memory,
            "ids": new.tolist(), **facts}


def write_model(folder: Path) -> dict:
    """The tiny preset, random init, as release weights (ours) and an export (transformers)."""
    from llmpipe.config import load
    from llmpipe.export import export_weights
    from llmpipe.model import Transformer
    from llmpipe.model.release import save_release

    cfg = load(ROOT / "configs" / "tiny.yaml").model
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_release(model, folder / "release")
    (folder / "hf").mkdir(parents=True, exist_ok=True)
    export_weights(folder / "release", folder / "hf")
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "seq_len": cfg.seq_len}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt (tokens)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations first")
    parser.add_argument("--repeats", type=int, default=10, help="timed generations (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every case, alternating, keeping the fastest")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: IMPL:BATCH, print JSON
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # internal: where write_model put the weights
    args = parser.parse_args(argv)

    if args.one:
        impl, batch = args.one.split(":")
        print(json.dumps(run_case(impl, int(batch), args)))
        return 0

    batches = [int(b) for b in args.batches.split(",")]
    best: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        facts = write_model(Path(tmp))
        if args.prompt_len + args.new_tokens > facts["seq_len"]:
            parser.error(f"--prompt-len + --new-tokens must fit the context of {facts['seq_len']}")
        for round_ in range(args.rounds):
            for batch in batches:
                for impl in (IMPLS if round_ % 2 == 0 else IMPLS[::-1]):
                    cmd = [sys.executable, __file__, "--one", f"{impl}:{batch}", "--folder", tmp,
                           *(f"--{key.replace('_', '-')}={getattr(args, key)}" for key in
                             ("prompt_len", "new_tokens", "warmup", "repeats", "threads", "device"))]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(f"{impl} batch {batch}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                        return 1
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(f"{impl} batch {batch}: {r['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
                    if r["tokens_per_s"] > best.get((impl, batch), {}).get("tokens_per_s", 0):
                        best[(impl, batch)] = r

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    attention = best[("transformers", batches[0])].get("attention")
    print(f"tiny preset, random init ({facts['params_M']:.2f}M params), float32, {device}, {args.threads} torch threads; "
          f"greedy, KV cache, prompts up to {args.prompt_len} tokens + {args.new_tokens} new; tok/s from the fastest "
          f"of {args.repeats} (median in brackets); transformers attention: {attention}")
    print(f"{'implementation':<14} {'batch':>5} {'tok/s':>9} {'(median)':>9} {'ms/token':>9} {'peak mem':>13} {'same ids':>9}")
    for batch in batches:
        ours, theirs = best[("llmpipe", batch)], best[("transformers", batch)]
        same = f"{sum(a == b for a, b in zip(ours['ids'], theirs['ids']))}/{batch}"
        for r in (ours, theirs):
            print(f"{r['impl']:<14} {batch:>5} {r['tokens_per_s']:9,.0f} "
                  f"{'(' + format(batch * args.new_tokens / r['median'], ',.0f') + ')':>9} "
                  f"{r['seconds'] / args.new_tokens * 1e3:9.2f} {r['memory']:>13} {same:>9}")
    for batch in batches:
        ratio = best[("llmpipe", batch)]["tokens_per_s"] / best[("transformers", batch)]["tokens_per_s"]
        print(f"llmpipe/transformers batch {batch:>3}: {ratio:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
