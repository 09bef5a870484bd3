"""Post-training data: the readers of TRL's formats (JSONL, Parquet, save_to_disk), their skip
counts, and the `instruct` stage's default data (deterministic, split by question, checked)."""

import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from model_fixtures import write_tokenizer

from llmpipe.alignment.checker import TASKS, check, make_question
from llmpipe.alignment.data import RowCounts, load_conversations, load_preferences, load_prompts
from llmpipe.alignment.instruct import KINDS, instruct_stage
from llmpipe.alignment.render import ChatEncoder, encode_pairs
from llmpipe.alignment.sft import encode_conversations
from llmpipe.config import InstructSection
from llmpipe.context import StageContext
from llmpipe.errors import BadValue
from llmpipe.paths import RunDir
from llmpipe.tokenizer.train import load_tokenizer

USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- readers -------------------------------------------------------------------------------------


def test_sft_rows_in_each_format_become_the_same_messages(tmp_path):
    rows = [{"messages": [USER, ASSISTANT]}, {"prompt": "What is 2 + 2?", "completion": "4"},
            {"prompt": [USER], "completion": [ASSISTANT]}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [USER, ASSISTANT]}]), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": "4"}]).save_to_disk(str(saved))

    counts = RowCounts("sft.data")
    conversations = load_conversations([jsonl, parquet, saved], counts)
    assert [c.messages for c in conversations] == [[USER, ASSISTANT]] * 5
    assert [c.index for c in conversations] == [0, 1, 2, 3, 4]  # one index across the files
    assert counts.to_manifest() == {"read": 5, "kept": 5, "skipped": {}, "first_skipped": []}


def test_bad_rows_are_skipped_and_counted_by_reason_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [USER, ASSISTANT]},
        {"text": "no messages"},
        "{not json",
        {"messages": "a string"},
        {"messages": [USER, {"role": "assistant", "content": "  "}]},
        {"messages": [USER]},
        {"messages": [{"role": "robot", "content": "x"}, ASSISTANT]},
        {"prompt": "What is 3 + 3?", "completion": "6"},
    ])
    counts = RowCounts("sft.data")
    conversations = load_conversations([path], counts)
    assert [c.index for c in conversations] == [0, 7]  # indices count the skipped rows too
    manifest = counts.to_manifest()
    assert manifest["read"] == 8 and manifest["kept"] == 2 and sum(manifest["skipped"].values()) == 6
    assert manifest["skipped"]["missing key 'messages'"] == 1
    assert manifest["skipped"]["invalid JSON"] == 1
    assert manifest["skipped"]["empty assistant turn"] == 1
    assert manifest["skipped"]["no assistant turn"] == 1
    assert manifest["skipped"]["messages is not a list of messages"] == 1
    assert manifest["skipped"]["messages has an unknown role 'robot'"] == 1
    assert manifest["first_skipped"][0] == f"{path}:2: missing key 'messages'"
    assert manifest["first_skipped"][1] == f"{path}:3: invalid JSON"


def test_a_file_with_no_usable_row_stops_with_one_line_naming_it(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": [USER, ASSISTANT]}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [USER]}, {"chosen": "x"}])
    with pytest.raises(BadValue) as err:
        load_conversations([good, bad], RowCounts("sft.data"))
    message = str(err.value)
    assert "\n" not in message and "sft.data" in message and str(bad) in message and str(good) not in message


def test_rows_longer_than_max_length_are_skipped_after_rendering(tmp_path):
    encoder = ChatEncoder(load_tokenizer(write_tokenizer(tmp_path / "tok")))
    long_reply = {"role": "assistant", "content": "word " * 200}
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [USER, ASSISTANT]}, {"messages": [USER, long_reply]}])
    counts = RowCounts("sft.data")
    kept = encode_conversations(encoder, load_conversations([path], counts), 64, counts)
    assert len(kept) == 1 and counts.skipped == {"longer than max_length=64 tokens": 1}
    with pytest.raises(BadValue, match="no usable row"):
        counts = RowCounts("sft.data")
        encode_conversations(encoder, load_conversations([path], counts), 4, counts)


def test_preferences_in_standard_conversational_and_implicit_prompt_formats(tmp_path):
    chosen, rejected = ASSISTANT, {"role": "assistant", "content": "5"}
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [USER], "chosen": [chosen], "rejected": [rejected]},
        {"chosen": [USER, chosen], "rejected": [USER, rejected]},  # TRL's implicit prompt
        {"prompt": "x", "chosen": "4"},
    ])
    counts = RowCounts("dpo.data")
    pairs = load_preferences([path], counts)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [([USER], [chosen], [rejected])] * 3
    assert counts.skipped == {"missing key 'rejected'": 1}


def test_prompts_keep_task_and_answer_and_reject_unknown_tasks(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "What is 2 + 2?", "task": "add", "answer": 4},
        {"prompt": "Say hi"},
        {"prompt": "x", "task": "astrology", "answer": "y"},
    ])
    counts = RowCounts("ppo.data")
    prompts = load_prompts([path], counts)
    assert [(p.prompt, p.task, p.answer) for p in prompts] == [([USER], "add", "4"),
                                                                 ([{"role": "user", "content": "Say hi"}], None, None)]
    assert counts.skipped == {"unknown task 'astrology'": 1}


# --- the checker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_the_checker_accepts_each_answer_and_rejects_its_wrong_one(task):
    rng = random.Random(0)
    for _ in range(20):
        question = make_question(task, rng)
        assert check(task, question.answer, question.answer)
        assert check(task, f" {question.answer}.\n", question.answer)  # lenient on the wrapping
        assert question.wrong != question.answer
        assert not check(task, question.wrong, question.answer)


def test_the_checker_names_an_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        check("nope", "1", "1")


# --- the instruct stage --------------------------------------------------------------------------

SMALL = InstructSection(doc_examples=60, task_examples=200, modules=["json", "textwrap", "string"],
                        heldout_fraction=0.2)


def run_instruct(root, cfg=SMALL, seed=3):
    run_dir = RunDir(root)
    out = run_dir.stage("instruct")
    out.mkdir(parents=True)
    manifest = instruct_stage(StageContext("instruct", run_dir, out, seed), cfg)
    return out, manifest


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def instruct_out(tmp_path_factory):
    return run_instruct(tmp_path_factory.mktemp("instruct"))


def test_instruct_gives_the_same_bytes_in_another_folder(instruct_out, tmp_path):
    out, manifest = instruct_out
    again, manifest_again = run_instruct(tmp_path / "elsewhere")
    assert manifest == manifest_again
    for kind in KINDS:
        for split in ("train", "heldout"):
            assert (out / kind / f"{split}.jsonl").read_bytes() == (again / kind / f"{split}.jsonl").read_bytes()
    other, _ = run_instruct(tmp_path / "seeded", seed=4)
    assert (other / "sft" / "train.jsonl").read_bytes() != (out / "sft" / "train.jsonl").read_bytes()


def test_the_documentation_read_is_the_same_in_every_process():
    """A default's repr names a memory address (`shutil.move(..., copy_function=<function copy2 at
    0x7f06...>)`), other in each process: two demo runs made other SFT data (found by `llmpipe reproduce`)."""
    from llmpipe.alignment.instruct import stdlib_records

    first, second = stdlib_records(["shutil", "logging"]), stdlib_records(["shutil", "logging"])
    signatures = {r["name"]: r["signature"] for r in first}
    assert "copy_function=<function copy2>" in signatures["move"]
    assert "<weakref; to '_StderrHandler'>" in signatures["shutdown"]
    assert first == second and not any(" at 0x" in json.dumps(r) for r in first)


def test_no_question_is_in_both_splits(instruct_out):
    out, manifest = instruct_out
    for kind in KINDS:
        train = {json.dumps(r["messages"][:-1] if kind == "sft" else r["prompt"]) for r in read_jsonl(out / kind / "train.jsonl")}
        heldout = {json.dumps(r["messages"][:-1] if kind == "sft" else r["prompt"]) for r in read_jsonl(out / kind / "heldout.jsonl")}
        assert train and heldout and not train & heldout
    assert manifest["sft_heldout"] + manifest["sft_train"] == len(read_jsonl(out / "sft" / "train.jsonl")) + \
        len(read_jsonl(out / "sft" / "heldout.jsonl"))


def test_instruct_files_are_read_by_the_loaders_and_checked(instruct_out, tmp_path):
    out, _ = instruct_out
    counts = RowCounts("sft.data")
    conversations = load_conversations([out / "sft" / "train.jsonl"], counts)
    assert counts.kept == counts.read == len(conversations)
    documented = [c for c in conversations if "`json" in c.messages[0]["content"] or "`textwrap" in c.messages[0]["content"]]
    assert documented  # the standard library's documentation is a source
    prompts = load_prompts([out / "prompts" / "heldout.jsonl"], RowCounts("prompts"))
    assert prompts and {p.task for p in prompts} <= set(TASKS)
    assert all(check(p.task, p.answer, p.answer) for p in prompts)
    pairs = load_preferences([out / "preferences" / "train.jsonl"], RowCounts("dpo.data"))
    assert pairs and all(p.chosen != p.rejected for p in pairs)
    encoder = ChatEncoder(load_tokenizer(write_tokenizer(tmp_path / "tok")))
    assert encode_pairs(encoder, pairs, 10_000, RowCounts("dpo.data"))
