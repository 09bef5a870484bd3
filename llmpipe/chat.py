"""`llmpipe chat`: a conversation with a stage's model, its replies streamed as they are made.

    session = load_session(run_dir, "sft", system="You are terse.", temperature=0)
    session.send("Hi", on_text=print_piece)   # the reply; on_text got it piece by piece
    session.send("And then?")                 # the model sees both turns
    session.reset()                           # back to the system message alone

The model is fed `ChatEncoder.prompt(messages)`, the chat template with the generation prompt
(what SFT and DPO trained on, and what an export's `apply_chat_template` gives). A reply ends
at `<|end|>` (end of turn) or `<|endoftext|>` (end of document), neither of which it includes,
or after `max_new_tokens`. A conversation that outgrows the context loses its oldest turns; the
system message stays.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from llmpipe.alignment.render import ChatEncoder
from llmpipe.errors import BadValue
from llmpipe.generate import check_sampling, load_stage_model
from llmpipe.model.generate import generate
from llmpipe.model.model import Transformer

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 256  # when not given: this or half the context, whichever is less


def default_max_new_tokens(context: int) -> int:
    """The longest reply when none is asked for: DEFAULT_MAX_NEW_TOKENS, or half the context."""
    return min(DEFAULT_MAX_NEW_TOKENS, context // 2)


class TextStream:
    """Token ids in, printable text out: each `push` returns the text the new token completes.

    A byte-level token can hold part of a multi-byte UTF-8 character; until the rest arrives the
    decoded text ends with U+FFFD, and nothing is returned. `flush` returns what is left, so the
    pieces always join to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # what has been returned so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an unfinished character (or a real U+FFFD: it waits one token)
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def _advance(self, text: str) -> str:
        piece, self.text = text[len(self.text):], text
        return piece


class _EndOfReply(Exception):
    """Raised from generate's per-token callback at a stop token: `generate` stops at one id, a
    reply at either `<|end|>` or `<|endoftext|>`."""


class ChatSession:
    """A conversation with one model: `messages` grows by a user and an assistant turn per `send`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, system: str | None = None,
                 max_new_tokens: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int | None = None, top_p: float | None = DEFAULT_TOP_P, seed: int = 0):
        check_sampling(temperature, top_k, top_p)
        context = model.cfg.seq_len
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(context)
        if not 1 <= max_new_tokens < context:
            raise BadValue(f"max_new_tokens={max_new_tokens} must be in [1, {context}) (the model's context)")
        self.model = model.eval()
        self.encoder = ChatEncoder(tokenizer)
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.device = model.tok_emb.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stop_ids = {self.encoder.end, self.encoder.eot}
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; keep the system message."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves room for a whole reply in the context."""
        return self.model.cfg.seq_len - self.max_new_tokens

    def context(self, messages: list[dict]) -> list[dict]:
        """The newest turns of `messages` whose prompt fits `max_prompt_tokens`: the system message
        stays, the oldest turns go (a leading assistant turn with the user turn before it)."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        # the template is a concatenation of turns: the prompt's length is the sum of theirs
        fixed = len(self.encoder.prompt(system))  # <|endoftext|>, the system turn, <|assistant|>
        sizes = [len(self.encoder.conversation([turn]).ids) - 1 for turn in turns]  # each without the <|endoftext|>
        start = 0
        while start < len(turns) and fixed + sum(sizes[start:]) > self.max_prompt_tokens:
            start += 1
            while start < len(turns) and turns[start]["role"] == "assistant":
                start += 1
        if start == len(turns) and turns:
            need = fixed + sizes[-1]
            raise BadValue(f"the last message needs a prompt of {need} tokens; with max_new_tokens="
                           f"{self.max_new_tokens} the context of {self.model.cfg.seq_len} holds "
                           f"{self.max_prompt_tokens} (shorten it or lower --max-new-tokens)")
        return system + turns[start:]

    def reply_ids(self, messages: list[dict], on_text: Callable[[str], None] | None = None) -> list[int]:
        """The ids of the model's next turn after `messages`, without the stop token; `on_text`
        gets the text as it is made."""
        ids = self.encoder.prompt(self.context(messages))
        new: list[int] = []
        stream = TextStream(self.encoder.tokenizer)

        def on_token(token: torch.Tensor) -> None:  # (1, 1)
            token_id = int(token[0, 0])
            if token_id in self.stop_ids:
                raise _EndOfReply
            new.append(token_id)
            if on_text is not None and (piece := stream.push(token_id)):
                on_text(piece)

        try:
            generate(self.model, torch.tensor([ids], device=self.device), self.max_new_tokens,
                     temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                     generator=self.generator, on_token=on_token)
        except _EndOfReply:
            pass
        if on_text is not None and (piece := stream.flush()):
            on_text(piece)
        return new

    def reply(self, messages: list[dict], on_text: Callable[[str], None] | None = None) -> str:
        """The model's next turn after `messages` (which are left as they are), decoded."""
        return self.encoder.tokenizer.decode(self.reply_ids(messages, on_text), skip_special_tokens=False)

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Say `text` as the user; the reply and `text` join the conversation (neither does if
        the reply fails or is interrupted)."""
        user = {"role": "user", "content": text}
        answer = self.reply([*self.messages, user], on_text)
        self.messages += [user, {"role": "assistant", "content": answer}]
        return answer


def load_session(run_dir: Path, stage: str, **settings) -> ChatSession:
    """A session with a completed stage's release model (verified against its manifest)."""
    model, tokenizer = load_stage_model(run_dir, stage)
    return ChatSession(model, tokenizer, **settings)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def answer_once(session: ChatSession, prompt: str, write: Callable[[str], None] = _write) -> str:
    """`--prompt`: the reply alone, streamed, then a newline."""
    answer = session.send(prompt, on_text=write)
    write("\n")
    return answer


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] = _write) -> int:
    """The terminal conversation: a line in, the reply streamed out, until end of input or
    `/exit`; `/reset` clears the conversation. Ctrl-C during a reply drops that turn."""
    if read is input and sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    write("/reset clears the conversation, /exit or Ctrl-D leaves\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        if not command:
            continue
        try:
            session.send(line, on_text=write)
        except KeyboardInterrupt:
            write(" [interrupted]")
        except BadValue as err:  # a message too long for the context: say so and go on
            write(f"({err})")
        write("\n")
