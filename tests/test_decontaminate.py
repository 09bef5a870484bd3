"""N-gram decontamination: planted overlaps are found and named, clean items are not, on literal texts."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import xxhash
from datatrove.utils.text import TextNormConfig, simplify_text

from llmpipe.errors import BadValue
from llmpipe.eval import decontaminate as D
from llmpipe.eval.decontaminate import NORM, TrainingIndex, flag, ngram_hashes, ngrams, summary, words

QUESTION = ("Which river did the expedition of seventeen ninety cross twice before reaching the salt "
            "marshes near the old abbey at dawn")  # 21 words: 9 13-grams
SPAN = QUESTION.split()[3:16]  # 13 words: "the expedition ... near"
CLEAN = ("How many moons orbit the frozen planet described in the third chapter of the sailor's "
         "logbook from the northern voyage")


def _vocabulary(rng: random.Random, size: int = 500) -> list[str]:
    """Made-up words that no English question contains."""
    return sorted({"".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiouy") for _ in range(3))
                   for _ in range(size)})


def _documents(seed: int = 0, count: int = 12, length: int = 200) -> list[str]:
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    return [" ".join(rng.choice(vocab) for _ in range(length)) for _ in range(count)]


def _write_jsonl_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _prepared_folder(root: Path, texts: list[str]) -> tuple[Path, list[str]]:
    """`prepare`'s layout: <rank>.jsonl.gz files of {text, id, metadata: {url}}; the urls in order."""
    folder = root / "documents"
    urls = [f"https://example.org/page/{i}" for i in range(len(texts))]
    records = [{"text": t, "id": f"warc/{i}", "metadata": {"url": u, "source": "warc"}}
               for i, (t, u) in enumerate(zip(texts, urls))]
    half = len(records) // 2
    _write_jsonl_gz(folder / "00000.jsonl.gz", records[:half])
    _write_jsonl_gz(folder / "00001.jsonl.gz", records[half:])
    return folder, urls


def _plant(text: str, span: list[str], at: int = 50) -> str:
    body = text.split()
    return " ".join(body[:at] + span + body[at:])


# --- normalisation and n-grams -----------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "The Quick,  brown\tfox!\n\nJumped over 3.14 lazy dogs in 1969.",
    "  Café “naïve” résumé — déjà vu…  ",
    "well-known don't (parenthesised) [bracketed] {braced} a/b a_b",
    "no\u00a0break\u2003em\u2000quad\u3000ideographic\x1cfile-sep\x85nel",
    "全角，标点。混合！ text ﬁ ligature Ⅻ ２０２４年",
    "combining a\u0301 e\u0300 standalone \u0301 mark",
    "",
])
def test_words_are_datatrove_simplify_text_split(text):
    assert words(text) == simplify_text(text, NORM).split()
    assert words(text, TextNormConfig()) == simplify_text(text).split()


def test_normalisation_lowercases_strips_punctuation_and_keeps_numbers():
    assert words("In 1969, Apollo-11 LANDED; it's café time.") == \
        ["in", "1969", "apollo", "11", "landed", "it", "s", "cafe", "time"]
    assert ngrams("What is 12 + 30? 42", 5) != ngrams("What is 12 + 31? 43", 5)  # sums differ in their numbers


def test_ngrams_are_sliding_windows_of_n_words():
    assert ngrams("A b, C d.", 2) == {"a b", "b c", "c d"}
    assert ngrams("a b a b a", 2) == {"a b", "b a"}  # a set: repeats count once
    assert ngrams("a b c", 3) == {"a b c"}


def test_text_shorter_than_n_has_no_ngrams():
    assert ngrams("one two three", 4) == set()
    assert len(ngram_hashes("one two three", 4)) == 0


def test_hashes_are_xxhash64_of_the_space_joined_ngram():
    expected = [xxhash.xxh64_intdigest("the quick brown"), xxhash.xxh64_intdigest("quick brown fox")]
    assert ngram_hashes("The quick, BROWN fox", 3).tolist() == expected


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_ngram_size_must_be_a_positive_integer(n):
    with pytest.raises(BadValue):
        TrainingIndex(n=n)
    with pytest.raises(BadValue):
        ngrams("a b c", n)


# --- flagging against prepare's documents ----------------------------------------------------------


def test_planted_span_is_flagged_with_its_documents_url(tmp_path):
    texts = _documents()
    texts[7] = _plant(texts[7], SPAN)
    folder, urls = _prepared_folder(tmp_path, texts)
    index = TrainingIndex.from_documents(folder)
    assert index.documents == 12 and index.skipped == {}

    flags = flag([("q-planted", QUESTION), ("q-clean", CLEAN)], index)
    assert flags == [
        {"id": "q-planted", "contaminated": True, "source": urls[7], "ngrams": 1},
        {"id": "q-clean", "contaminated": False, "source": None, "ngrams": 0},
    ]
    assert summary(flags) == {"n": 2, "n_contaminated": 1, "examples": [{"id": "q-planted", "source": urls[7]}]}


def test_case_and_punctuation_differences_still_match(tmp_path):
    texts = _documents()
    shouted = ["“" + SPAN[0].upper() + ","] + [w.capitalize() + "." for w in SPAN[1:7]] + SPAN[7:] + ["!!"]
    texts[2] = _plant(texts[2], shouted)
    folder, urls = _prepared_folder(tmp_path, texts)
    assert flag([("q", QUESTION)], TrainingIndex.from_documents(folder))[0]["source"] == urls[2]


def test_count_is_distinct_shared_ngrams_and_source_is_the_earliest_document(tmp_path):
    texts = _documents()
    texts[9] = _plant(texts[9], QUESTION.split())  # all 21 words: its 9 13-grams
    texts[4] = _plant(texts[4], SPAN)  # an earlier document shares one of them
    folder, urls = _prepared_folder(tmp_path, texts)
    [result] = flag([("q", QUESTION + " " + QUESTION.split()[0])], TrainingIndex.from_documents(folder))
    assert result == {"id": "q", "contaminated": True, "source": urls[4], "ngrams": 9}


def test_item_shorter_than_n_is_never_flagged(tmp_path):
    short = " ".join(SPAN[:12])  # 12 words, all inside a training document
    texts = _documents()
    texts[0] = _plant(texts[0], SPAN)
    folder, urls = _prepared_folder(tmp_path, texts)
    assert flag([("short", short)], TrainingIndex.from_documents(folder)) == \
        [{"id": "short", "contaminated": False, "source": None, "ngrams": 0}]
    assert flag([("short", short)], TrainingIndex.from_documents(folder, n=8))[0] == \
        {"id": "short", "contaminated": True, "source": urls[0], "ngrams": 5}


def test_source_falls_back_to_id_then_file_and_line(tmp_path):
    folder = tmp_path / "docs"
    span = " ".join(SPAN)
    _write_jsonl_gz(folder / "a" / "0.jsonl.gz", [
        {"text": "with url " + span + " one", "id": "x", "metadata": {"url": "https://a.example/1"}},
        {"text": "with id " + span + " two", "id": "doc-2"},
        {"text": "   ", "id": "blank"},
        {"text": "with neither " + span + " three"},
    ])
    (folder / "b.jsonl").write_text("not json\n" + json.dumps({"text": span + " four"}) + "\n[1]\n")
    index = TrainingIndex.from_documents(folder)
    assert index.sources == ["https://a.example/1", "doc-2", "a/0.jsonl.gz:4", "b.jsonl:2"]
    assert index.skipped == {"empty_text": 1, "malformed_json": 1, "not_an_object": 1}
    assert flag([("q", span)], index)[0]["source"] == "https://a.example/1"


def test_index_is_the_same_when_compacted_often(tmp_path, monkeypatch):
    texts = _documents(count=30)
    for k in (3, 11, 25):
        texts[k] = _plant(texts[k], SPAN, at=10 * k % 150)
    pairs = [(f"doc-{i}", t) for i, t in enumerate(texts)]
    whole = TrainingIndex(pairs)
    monkeypatch.setattr(D, "_COMPACT_AT", 150)
    pieces = TrainingIndex(pairs)
    assert len(pieces) == len(whole)
    assert (pieces._hashes == whole._hashes).all() and (pieces._owners == whole._owners).all()
    assert flag([("q", QUESTION)], pieces) == flag([("q", QUESTION)], whole)
    assert flag([("q", QUESTION)], pieces)[0]["source"] == "doc-3"


def test_adding_after_a_lookup_keeps_the_first_source():
    span = " ".join(SPAN)
    index = TrainingIndex([("first", span)])
    assert flag([("q", QUESTION)], index)[0]["source"] == "first"
    index.add("second", span + " and " + QUESTION)
    assert flag([("q", QUESTION)], index)[0] == {"id": "q", "contaminated": True, "source": "first", "ngrams": 9}


def test_empty_index_flags_nothing():
    assert flag([("q", QUESTION)], TrainingIndex()) == [{"id": "q", "contaminated": False, "source": None,
                                                         "ngrams": 0}]


# --- chat data -------------------------------------------------------------------------------------


def test_chat_rows_are_indexed_with_file_and_line_sources(tmp_path):
    span = " ".join(SPAN)
    rows = [
        {"messages": [{"role": "user", "content": "Tell me a story."},
                      {"role": "assistant", "content": "Once " + span + " the end."}]},
        None,  # a blank line
        {"prompt": "Summarise:", "completion": "nothing to see here"},
        {"prompt": [{"role": "user", "content": "Pick one"}], "chosen": "fine",
         "rejected": [{"role": "assistant", "content": span.upper() + "!"}]},
        {"prompt": "Q", "completion": span},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows) + "{oops\n[]\n{}\n")
    index = TrainingIndex()
    assert index.add_jsonl_texts(path) == 4
    assert index.skipped == {"malformed_json": 1, "not_an_object": 1, "no_text": 1}
    assert index.sources == ["sft.jsonl:1", "sft.jsonl:4", "sft.jsonl:5"]  # line 3 is shorter than 13 words
    assert flag([("q", QUESTION)], index)[0]["source"] == "sft.jsonl:1"

    rejected_only = TrainingIndex()
    rejected_only.add_jsonl_texts(path, fields=("rejected",))
    assert rejected_only.sources == ["sft.jsonl:4"]
    assert flag([("q", QUESTION)], rejected_only)[0] == {"id": "q", "contaminated": True,
                                                         "source": "sft.jsonl:4", "ngrams": 1}


def test_prompt_and_completion_join_across_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": " ".join(SPAN[:6]), "completion": " ".join(SPAN[6:])}) + "\n")
    index = TrainingIndex()
    index.add_jsonl_texts(path)
    assert flag([("q", QUESTION)], index)[0]["source"] == "pairs.jsonl:1"


def test_summary_names_the_first_five_contaminated_items():
    flags = [{"id": f"q{i}", "contaminated": i % 2 == 0, "source": f"s{i}" if i % 2 == 0 else None,
              "ngrams": int(i % 2 == 0)} for i in range(14)]
    assert summary(flags) == {"n": 14, "n_contaminated": 7,
                              "examples": [{"id": f"q{i}", "source": f"s{i}"} for i in (0, 2, 4, 6, 8)]}
