"""The documents reader and the shard stage: exact token totals, deterministic splits, checksums."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe import io, stages
from llmpipe.config import validate
from llmpipe.data.documents import DocumentCounts, NoDocumentsError, read_documents
from llmpipe.data.shard import write_shards
from llmpipe.data.shards import load_split, read_tokens
from llmpipe.errors import UserError
from llmpipe.tokenizer.special import EOT, EOT_ID
from llmpipe.tokenizer.train import load_tokenizer

SEQ_LEN, TOKENS_PER_SHARD = 64, 1024 + 10  # rounds down to 1024 = 16 rows


def make_corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "naïve", "東京", "🎉", "def", "x = 1", "\t", "\n", "  ", "Hello", "über", "€5"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 120))) for _ in range(n)]
    texts[7] = f"a document that mentions {EOT} literally"
    return texts


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))


@pytest.fixture(scope="module")
def texts():
    return make_corpus()


@pytest.fixture(scope="module")
def run(tmp_path_factory, texts):
    """tokenizer then shard through the executor, on documents split over two files."""
    root = tmp_path_factory.mktemp("shard")
    write_jsonl(root / "docs" / "a.jsonl", texts[:120])
    write_jsonl(root / "docs" / "sub" / "b.jsonl", texts[120:])
    config = validate({
        "run": {"run_dir": str(root / "run"), "seed": 7},
        "tokenizer": {"vocab_size": 400, "input": str(root / "docs")},
        "shard": {"input": str(root / "docs"), "seq_len": SEQ_LEN, "tokens_per_shard": TOKENS_PER_SHARD,
                  "val_fraction": 0.2, "batch_docs": 16},
    })
    stages.execute("tokenizer", config)
    manifest = stages.execute("shard", config).manifest
    return root, manifest


def encoded(tokenizer_dir, text):
    """The independent oracle: the saved tokenizer, special-token strings encoded as text."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = True
    return tokenizer.encode(text, add_special_tokens=False).ids


def documents_of(stream: np.ndarray) -> list[list[int]]:
    """Split a packed token stream at EOTs back into documents (every document ends with one)."""
    assert len(stream) == 0 or stream[-1] == EOT_ID
    ends = np.flatnonzero(stream == EOT_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e].tolist() for s, e in zip(starts, ends)]


def test_totals_equal_encoded_documents_plus_one_eot_each(run, texts):
    root, manifest = run
    tok_dir = root / "run" / "tokenizer"
    counts = manifest["counts"]
    expected = {tuple(encoded(tok_dir, t)) for t in texts}
    assert counts["documents"] == len(texts) == counts["train_documents"] + counts["val_documents"]
    assert counts["train_tokens"] + counts["val_tokens"] == sum(len(encoded(tok_dir, t)) + 1 for t in texts)

    seen = []
    for split in ("train", "val"):
        stream = np.concatenate(load_split(root / "run" / "shard", split))
        docs = documents_of(stream)
        assert len(stream) == counts[f"{split}_tokens"]
        assert len(docs) == counts[f"{split}_documents"] > 0
        seen += [tuple(d) for d in docs]
    assert sorted(seen) == sorted(tuple(encoded(tok_dir, t)) for t in texts)  # each document once, exactly
    assert set(seen) == expected


def test_shards_have_fixed_size_and_are_listed(run):
    root, manifest = run
    shards = manifest["details"]["shards"]
    assert manifest["counts"]["tokens_per_shard"] == 1024
    for split in ("train", "val"):
        mine = [s for s in shards if s["split"] == split]
        assert [s["file"] for s in mine] == [f"{split}_{i:05d}.arrow" for i in range(len(mine))]
        assert all(s["tokens"] == 1024 and s["rows"] == 16 for s in mine[:-1])
        assert 0 < mine[-1]["tokens"] <= 1024 and mine[-1]["rows"] == -(-mine[-1]["tokens"] // SEQ_LEN)
        assert sum(s["tokens"] for s in mine) == manifest["counts"][f"{split}_tokens"]
    assert len([s for s in shards if s["split"] == "train"]) >= 3
    for shard in shards:
        entry = manifest["files"][shard["file"]]
        assert entry["sha256"] == io.sha256_file(root / "run" / "shard" / shard["file"])
        assert read_tokens(root / "run" / "shard" / shard["file"]).dtype == np.uint16


def test_literal_special_token_text_is_not_a_separator(run, texts):
    root, manifest = run
    streams = [np.concatenate(load_split(root / "run" / "shard", s)) for s in ("train", "val")]
    assert sum(int((s == EOT_ID).sum()) for s in streams) == len(texts)


def test_datasets_reads_a_shard(run):
    datasets = pytest.importorskip("datasets")
    root, manifest = run
    path = root / "run" / "shard" / "train_00000.arrow"
    dataset = datasets.Dataset.from_file(str(path))
    assert dataset.num_rows == 16 and dataset.column_names == ["input_ids"]
    assert dataset[0]["input_ids"] == read_tokens(path)[:SEQ_LEN].tolist()
    assert all(len(row) == SEQ_LEN for row in dataset["input_ids"])


def test_flipped_byte_raises_checksum_error_naming_the_file(run, tmp_path):
    import shutil

    root, _ = run
    copy = tmp_path / "shard"
    shutil.copytree(root / "run" / "shard", copy)
    victim = copy / "train_00001.arrow"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert len(load_split(copy, "val")) >= 1  # other files still verify
    with pytest.raises(io.ChecksumError) as err:
        load_split(copy, "train", verify=True)
    assert str(err.value).startswith(f"checksum mismatch in {victim}: expected sha256 ")
    assert str(err.value).endswith("; rebuild it with `llmpipe run ... --force shard`")


def val_set(tok_dir, texts, out, seed):
    result = write_shards(iter(texts), load_tokenizer(tok_dir), out, seq_len=SEQ_LEN,
                          tokens_per_shard=1024, val_fraction=0.2, seed=seed, batch_docs=5)
    stream = np.concatenate([read_tokens(out / s["file"]) for s in result["shards"] if s["split"] == "val"])
    return result, {tuple(d) for d in documents_of(stream)}


def test_split_is_deterministic_per_seed(run, texts, tmp_path):
    tok_dir = run[0] / "run" / "tokenizer"
    first, val_a = val_set(tok_dir, texts, tmp_path / "a", seed=1)
    again, val_b = val_set(tok_dir, texts, tmp_path / "b", seed=1)
    other, val_c = val_set(tok_dir, texts, tmp_path / "c", seed=2)
    assert val_a == val_b and first["shards"] == again["shards"]
    for shard in first["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    assert val_a != val_c
    assert other["train_tokens"] + other["val_tokens"] == first["train_tokens"] + first["val_tokens"]
    # a document keeps its split whatever else is in the corpus
    _, val_half = val_set(tok_dir, texts[::2], tmp_path / "d", seed=1)
    assert val_half == {d for d in val_a if d in {tuple(encoded(tok_dir, t)) for t in texts[::2]}}


def test_no_validation_split_when_fraction_is_zero(run, texts, tmp_path):
    result = write_shards(iter(texts), load_tokenizer(run[0] / "run" / "tokenizer"), tmp_path, seq_len=SEQ_LEN,
                          tokens_per_shard=1024, val_fraction=0.0, seed=0)
    assert result["val_tokens"] == 0 and result["val_shards"] == 0
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "train_00000.arrow"


def test_bad_documents_are_counted_and_skipped(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    lines = [b'{"text": "good one"}', b'{"text": "unterminated', b'{"title": "no text"}', b'{"text": 42}',
             b'{"text": "   "}', b'{"text": "bad \xff\xfe bytes"}', b'{"text": "lone \\ud800 surrogate"}',
             b'["not", "an", "object"]', b'', b'{"text": null}', b'{"text": "good two \\u00e9"}']
    (docs / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(docs / "b.jsonl.gz", "wb") as f:
        f.write(b'{"text": "gzipped"}\nnot json\n')
    (docs / "c.gz.jsonl.gz").write_bytes(gzip.compress(b'{"text": "cut off"}\n')[:-12])  # truncated gzip
    pq.write_table(pa.table({"text": ["parquet one", None, ""], "n": [1, 2, 3]}), docs / "d.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), docs / "e.parquet")
    (docs / "f.txt").write_text("a plain text file\nwith two lines\n", encoding="utf-8")
    (docs / "g.md").write_bytes(b"latin-1 \xe9t\xe9")
    (docs / "h.csv").write_text("text\nnot read\n")
    (docs / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    with pa.OSFile(str(docs / "i.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": ["arrow doc"]}))

    counts = DocumentCounts()
    texts = list(read_documents(docs, counts))
    assert texts == ["good one", "good two é", "gzipped", "parquet one", "a plain text file\nwith two lines\n",
                     "arrow doc"]  # sorted by path; hidden, .csv and the truncated gzip's text are not read
    assert counts.skipped["malformed_json"] == 2
    assert counts.skipped["missing_text"] == 3  # no "text" key, null in JSON, null in Parquet
    assert counts.skipped["non_string_text"] == 1
    assert counts.skipped["empty_text"] == 2
    assert counts.skipped["undecodable"] == 3  # bad bytes in JSONL, lone surrogate, Latin-1 .md
    assert counts.skipped["not_an_object"] == 1
    assert counts.skipped["unreadable_file"] == 1
    assert counts.skipped["no_text_column"] == 1
    assert counts.skipped["unsupported_file"] == 1
    assert counts.skipped_documents == 12
    assert counts.documents == len(texts)
    assert list(read_documents(docs)) == texts  # same order every time


def test_missing_or_empty_folder_is_one_clear_line(tmp_path):
    with pytest.raises(NoDocumentsError, match="not found") as err:
        read_documents(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line, no traceback
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("x")
    with pytest.raises(NoDocumentsError, match="no document files") as err:
        read_documents(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
