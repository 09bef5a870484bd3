"""`llmpipe chat`: the conversation, its cropping and streaming, and greedy replies checked against
transformers' `generate` on the export (an oracle no one here wrote)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import MODEL, write_tokenizer

from llmpipe import io
from llmpipe.alignment.render import ChatEncoder
from llmpipe.chat import TextStream, chat_loop, load_session
from llmpipe.cli import build_parser, main
from llmpipe.config import ModelSection
from llmpipe.errors import BadValue
from llmpipe.export import export_hf
from llmpipe.model import Transformer
from llmpipe.model.release import CONFIG, WEIGHTS, save_release
from llmpipe.tokenizer.special import EOT_ID
from llmpipe.tokenizer.train import load_tokenizer

SYSTEM = "be brief"
# what the model is taught: (user message, reply, the token that ends the reply: 'end' or 'eot')
TAUGHT = [("hello world", "the quick brown fox", "end"), ("def f(x)", "return x + 1", "end"),
          ("the lazy dog", "hello model", "eot")]


def write_stage(run_dir, stage: str, model: Transformer) -> None:
    """A completed stage folder: release weights and the manifest `verify_outputs` checks."""
    folder = run_dir / stage
    save_release(model, folder)
    files = {name: {"sha256": io.sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
             for name in (WEIGHTS, CONFIG)}
    io.write_json(folder / "manifest.json", {"stage": stage, "files": files, "fingerprint": f"test-{stage}"})


def taught_model(encoder: ChatEncoder, steps: int = 150) -> Transformer:
    """The tiny model, trained until it answers each TAUGHT message with its reply and stop token."""
    torch.manual_seed(0)
    model = Transformer(ModelSection(**{**MODEL, "seq_len": 64}))
    rows = []
    for user, reply, stop in TAUGHT:
        prompt = encoder.prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
        completion = encoder.text(reply) + [encoder.end if stop == "end" else encoder.eot]
        ids = prompt + completion
        rows.append((ids[:-1], [-1] * (len(prompt) - 1) + completion))
    width = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [1] * (width - len(x)) for x, _ in rows])
    y = torch.tensor([y + [-1] * (width - len(y)) for _, y in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x, targets=y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    write_tokenizer(run_dir / "tokenizer")
    write_stage(run_dir, "sft", taught_model(ChatEncoder(load_tokenizer(run_dir / "tokenizer"))))
    return run_dir


def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["chat", *map(str, args)])
    return code, capsys.readouterr().out


def test_greedy_chat_matches_transformers_generate_on_the_export(chat_run, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = export_hf(chat_run, "sft", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    max_new = 16
    for user, reply, _ in [*TAUGHT, ("brown fox jumps", None, None)]:  # the last was never taught
        code, printed = _cli(capsys, "--run-dir", chat_run, "--stage", "sft", "--system", SYSTEM,
                             "--prompt", user, "--temperature", 0, "--max-new-tokens", max_new)
        assert code == 0
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        # the export's generation_config: stop at <|end|> or <|endoftext|>; greedy asked for here
        new = hf.generate(**ids, do_sample=False, max_new_tokens=max_new)[0, ids["input_ids"].shape[1]:].tolist()
        stopped = bool(new) and new[-1] in hf.generation_config.eos_token_id
        hf_reply = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        assert printed == hf_reply + "\n"
        if reply is not None:  # the taught replies end early, at <|end|> or at <|endoftext|>
            assert stopped and hf_reply == reply


def test_a_session_keeps_the_conversation(chat_run, monkeypatch):
    import llmpipe.chat

    fed = []
    real = llmpipe.chat.generate
    monkeypatch.setattr(llmpipe.chat, "generate", lambda model, idx, *a, **k: fed.append(idx[0].tolist()) or real(model, idx, *a, **k))
    session = load_session(chat_run, "sft", system=SYSTEM, temperature=0, max_new_tokens=12)
    first = session.send("hello world")
    assert first == "the quick brown fox"
    second = session.send("def f(x)")
    assert session.messages == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "hello world"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "def f(x)"}, {"role": "assistant", "content": second}]
    assert fed[1] == session.encoder.prompt(session.messages[:-1])  # the second turn saw the first
    session.reset()
    assert session.messages == [{"role": "system", "content": SYSTEM}]
    assert session.send("hello world") == first


def test_the_conversation_is_cropped_to_the_context(chat_run):
    session = load_session(chat_run, "sft", system=SYSTEM, temperature=0, max_new_tokens=24)  # 40 of 64 for the prompt
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(6):
        messages += [{"role": "user", "content": f"hello world {i}"}, {"role": "assistant", "content": f"the fox {i}"}]
    messages.append({"role": "user", "content": "the lazy dog"})
    kept = session.context(messages)
    assert kept[0] == messages[0] and kept[1]["role"] == "user"  # the system stays; a user turn comes next
    assert kept[1:] == messages[-len(kept) + 1:] and len(kept) < len(messages)  # the newest turns, in order
    assert len(session.encoder.prompt(kept)) <= session.max_prompt_tokens
    assert len(session.encoder.prompt(messages[:1] + messages[-len(kept) - 1:])) > session.max_prompt_tokens
    assert session.reply(messages) == session.reply(kept)
    with pytest.raises(BadValue, match="shorten it or lower --max-new-tokens"):
        session.context(messages[:1] + [{"role": "user", "content": "the quick brown fox " * 12}])
    with pytest.raises(BadValue, match="max_new_tokens"):
        load_session(chat_run, "sft", max_new_tokens=64)


def test_streamed_text_joins_to_the_reply(chat_run):
    session = load_session(chat_run, "sft", temperature=1.0, top_p=None, seed=3, max_new_tokens=30)
    pieces = []
    text = session.reply([{"role": "user", "content": "brown fox"}], on_text=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1


def test_text_stream_prints_whole_characters_only(chat_run):
    tokenizer = load_tokenizer(chat_run / "tokenizer")
    text = "naïve 🦊 jumps — 日本語 ok"
    stream, pieces = TextStream(tokenizer), []
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.encode()) // 2  # the byte-level tokenizer splits the multi-byte characters
    for token_id in ids:
        pieces.append(stream.push(token_id))
    pieces.append(stream.flush())
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert "🦊" in pieces or any(piece.endswith("🦊") for piece in pieces)


def test_prompt_mode_prints_only_the_reply_and_is_seeded(chat_run, capsys):
    args = ("--run-dir", chat_run, "--prompt", "hello world", "--system", SYSTEM, "--seed", 5, "--max-new-tokens", 12)
    code, printed = _cli(capsys, *args)
    assert code == 0 and _cli(capsys, *args) == (0, printed)
    session = load_session(chat_run, "sft", system=SYSTEM, seed=5, max_new_tokens=12)  # the defaults: T 0.7, top-p 0.9
    assert printed == session.send("hello world") + "\n"
    assert build_parser().parse_args(["chat", "--run-dir", "r"]).stage == "sft"


def test_chat_refuses_tampered_weights(chat_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(chat_run, run_dir)
    weights = run_dir / "sft" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["chat", "--run-dir", str(run_dir), "--prompt", "hi"]) == 2
    assert "sha256" in capsys.readouterr().err.lower()


def test_the_loop_resets_and_leaves(chat_run):
    session = load_session(chat_run, "sft", system=SYSTEM, temperature=0, max_new_tokens=12)
    lines = iter(["hello world", "  ", "/reset", "def f(x)", "/exit", "never read"])
    written = []
    assert chat_loop(session, read=lambda prompt: next(lines), write=written.append) == 0
    assert next(lines) == "never read"
    assert session.messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "def f(x)"},
                                {"role": "assistant", "content": "return x + 1"}]
    assert "the quick brown fox" in "".join(written) and "(conversation cleared)" in "".join(written)

    def end_of_input(prompt):
        raise EOFError

    assert chat_loop(session, read=end_of_input, write=written.append) == 0


def test_a_reply_ends_at_end_of_text_too(chat_run):
    session = load_session(chat_run, "sft", system=SYSTEM, temperature=0, max_new_tokens=16)
    ids = session.reply_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "the lazy dog"}])
    assert session.encoder.tokenizer.decode(ids) == "hello model" and EOT_ID not in ids
