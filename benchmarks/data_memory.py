"""Memory of the shard stage and of the token loader as the corpus grows: it should stay flat.

    python benchmarks/data_memory.py                  # corpora of 8 and 32 MB made on this machine
    python benchmarks/data_memory.py --sizes-mb 20,80

Each measurement runs in a fresh process, so its peak is its own. Rows:
    shard stage    read the documents from disk, encode, write Arrow shards (`write_shards`)
    token loader   every training window of those shards once, in the loader's shuffled order

Columns: the process's peak resident set (VmHWM: everything resident, the shards' memory-mapped
pages that the loader touched included; the kernel can drop those) and its peak anonymous memory
(RssAnon sampled as it runs: the heap, which is what must not grow with the corpus).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from shard_throughput import make_corpus  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """The largest RssAnon seen while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.peak_kb, self._stop = _status_kb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))


def child(args) -> dict:
    """One measurement in this (fresh) process."""
    from llmpipe import io
    from llmpipe.data.documents import DocumentCounts, read_documents
    from llmpipe.data.loader import TokenLoader
    from llmpipe.data.shard import write_shards
    from llmpipe.data.shards import load_split
    from llmpipe.tokenizer.train import load_tokenizer

    t0 = time.perf_counter()
    with PeakAnon() as anon:
        if args.child == "shard":
            result = write_shards(read_documents(args.docs, DocumentCounts()), load_tokenizer(args.tokenizer), args.shards,
                                  seq_len=args.seq_len, tokens_per_shard=args.tokens_per_shard, val_fraction=0.05,
                                  seed=0, batch_docs=512)
            tokens = result["train_tokens"] + result["val_tokens"]
            io.write_manifest(args.shards, {"files": {p.name: {"sha256": io.sha256_file(p)}  # what load_split verifies
                                                      for p in sorted(Path(args.shards).glob("*.arrow"))}})
        else:
            loader = TokenLoader(load_split(args.shards, "train"), args.seq_len, batch_size=8, seed=0)
            tokens = 0
            for _ in range(loader.total_windows // 8):
                x, _ = loader.next_batch()
                tokens += x.numel()
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "peak_rss_mb": _status_kb("VmHWM") / 1024,
            "peak_anon_mb": anon.peak_kb / 1024}


def measure(kind: str, docs: Path, tokenizer: Path, shards: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--docs", str(docs), "--tokenizer", str(tokenizer),
               "--shards", str(shards), "--seq-len", str(args.seq_len), "--tokens-per-shard", str(args.tokens_per_shard)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="8,32", help="corpus sizes to compare, comma-separated")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmpipe_memory_bench")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokens-per-shard", type=int, default=1 << 20)
    parser.add_argument("--child", choices=["shard", "loader"], help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return

    from llmpipe.data.documents import read_documents
    from llmpipe.tokenizer.train import save_tokenizer, train_tokenizer

    sizes = [float(s) for s in args.sizes_mb.split(",")]
    tokenizer = args.work_dir / f"tokenizer_{args.vocab_size}"
    rows = []
    for mb in sizes:
        docs = args.work_dir / f"docs_{mb:g}mb"
        if not docs.is_dir():
            print(f"making a {mb:g} MB corpus in {docs} ...", flush=True)
            make_corpus(docs, mb)
        if not (tokenizer / "tokenizer.json").is_file():
            texts = [t for t, _ in zip(read_documents(docs), range(2000))]
            save_tokenizer(train_tokenizer(texts, args.vocab_size), tokenizer)
        shards = args.work_dir / f"shards_{mb:g}mb"
        for kind in ("shard", "loader"):
            result = measure(kind, docs, tokenizer, shards, args)
            rows.append((kind, mb, result))
            print(f"  {kind} on {mb:g} MB: {result}", flush=True)

    print(f"\n{'row':<14}{'corpus MB':>10}{'tokens':>12}{'seconds':>9}{'tokens/s':>12}{'peak RSS MB':>13}{'peak anon MB':>14}")
    for kind, mb, r in rows:
        print(f"{kind + (' stage' if kind == 'shard' else ''):<14}{mb:>10g}{r['tokens']:>12,}{r['seconds']:>9.2f}"
              f"{r['tokens'] / r['seconds']:>12,.0f}{r['peak_rss_mb']:>13.1f}{r['peak_anon_mb']:>14.1f}")
    for kind in ("shard", "loader"):
        first, last = [r for k, _, r in rows if k == kind][0], [r for k, _, r in rows if k == kind][-1]
        print(f"{kind}: corpus x{sizes[-1] / sizes[0]:g} -> peak anonymous memory x{last['peak_anon_mb'] / first['peak_anon_mb']:.2f}")


if __name__ == "__main__":
    main()
