"""Throughput of the shard stage against plain `tokenizers` encoding of the same text.

    python benchmarks/shard_throughput.py                       # ~30 MB corpus made on this machine
    python benchmarks/shard_throughput.py --docs DIR --tokenizer DIR

Without --docs, a corpus is made once from the Python source files installed on this machine
(one document per file, in `.jsonl.gz` files as the prepare stage writes them) and reused.
Without --tokenizer, a byte-level BPE is trained on the first few MB of it and reused.

Rows (same text, same batches, all cores):
    encode_batch          tokenizers' encode_batch over in-memory texts (the issue's baseline)
    encode_batch_fast     the same without offsets (what the shard stage calls)
    shard stage           read the documents, encode, pack with EOTs, split, write Arrow shards
The issue asks the shard stage to reach at least 80% of the encode_batch rate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmpipe.data.documents import DocumentCounts, read_documents  # noqa: E402
from llmpipe.data.shard import BATCH_CHARS, text_batches, write_shards  # noqa: E402
from llmpipe.tokenizer.train import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402


def make_corpus(folder: Path, megabytes: float, docs_per_file: int = 2000) -> None:
    """Python sources of the installed packages and the standard library, one document per file."""
    roots = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"])]
    budget, written, part, batch = int(megabytes * 1e6), 0, 0, []
    folder.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal part, batch
        with gzip.open(folder / f"part_{part:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in batch)
        part, batch = part + 1, []

    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            batch.append(text)
            written += len(text.encode())
            if len(batch) >= docs_per_file:
                flush()
            if written >= budget:
                break
        if written >= budget:
            break
    if batch:
        flush()


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (rayon's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, help="folder of documents (default: make one in --work-dir)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: train one in --work-dir)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmpipe_shard_bench")
    parser.add_argument("--corpus-mb", type=float, default=30.0, help="size of the generated corpus")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--batch-docs", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokens-per-shard", type=int, default=1 << 22)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row, interleaved; the best is reported")
    args = parser.parse_args(argv)

    docs = args.docs
    if docs is None:
        docs = args.work_dir / f"docs_{args.corpus_mb:g}mb"
        if not docs.is_dir():
            print(f"making a {args.corpus_mb:g} MB corpus in {docs} ...", flush=True)
            make_corpus(docs, args.corpus_mb)
    tok_dir = args.tokenizer
    if tok_dir is None:
        tok_dir = args.work_dir / f"tokenizer_{args.vocab_size}"
        if not (tok_dir / "tokenizer.json").is_file():
            print(f"training a {args.vocab_size}-token BPE on 5M chars into {tok_dir} ...", flush=True)
            texts, total = [], 0
            for text in read_documents(docs):
                texts.append(text)
                total += len(text)
                if total >= 5_000_000:
                    break
            save_tokenizer(train_tokenizer(texts, args.vocab_size), tok_dir)

    texts = list(read_documents(docs))  # in memory: the encode rows measure encoding only
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {docs} ({len(texts)} documents, {mb:.1f} MB); cores: {os.cpu_count()}; "
          f"batch_docs={args.batch_docs}", flush=True)

    out = args.work_dir / "shards"

    def encoder(method: str):
        def run() -> int:
            tokenizer = load_tokenizer(tok_dir)
            tokenizer.encode_special_tokens = True  # as the shard stage encodes
            encode = getattr(tokenizer, method)
            return sum(len(e) for batch in text_batches(texts, args.batch_docs, BATCH_CHARS)
                       for e in encode(batch, add_special_tokens=False))
        return run

    def run_shard() -> int:
        shutil.rmtree(out, ignore_errors=True)
        result = write_shards(read_documents(docs, DocumentCounts()), load_tokenizer(tok_dir), out,
                              seq_len=args.seq_len, tokens_per_shard=args.tokens_per_shard,
                              val_fraction=args.val_fraction, seed=0, batch_docs=args.batch_docs)
        return result["train_tokens"] + result["val_tokens"]

    methods = {"encode_batch": encoder("encode_batch"), "encode_batch_fast": encoder("encode_batch_fast"),
               "shard stage": run_shard}
    best: dict[str, tuple[float, int, float]] = {}
    for round_ in range(args.repeat):  # interleaved, so a busy moment on the machine hits every row
        for name, fn in methods.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            tokens = fn()
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            print(f"  round {round_ + 1}: {name:<18} {seconds:7.2f} s wall {cpu:7.2f} s cpu", flush=True)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, tokens, cpu)
    shutil.rmtree(out, ignore_errors=True)
    rows = [(name, *best[name]) for name in methods]

    base_rate = mb / rows[0][1]
    print(f"\n{'method':<20}{'seconds':>9}{'MB/s':>9}{'Mtok/s':>9}{'vs encode_batch':>17}{'CPU s':>8}")
    for name, seconds, tokens, cpu in rows:
        print(f"{name:<20}{seconds:>9.2f}{mb / seconds:>9.2f}{tokens / seconds / 1e6:>9.2f}"
              f"{mb / seconds / base_rate:>16.0%}{cpu:>8.1f}")
    print("\n(best of", args.repeat, "interleaved runs by wall time; CPU s of that run, all threads; shard tokens "
          "include one EOT per document; MB are UTF-8 bytes of the document texts)")


if __name__ == "__main__":
    main()
