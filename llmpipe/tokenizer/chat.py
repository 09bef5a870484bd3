"""The chat template: an end-of-text token, then each turn as `<|role|>content<|end|>`.

    <|endoftext|><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

The leading end-of-text is what every pretraining document follows in the token stream (Llama's
templates open with their BOS the same way), so a conversation starts where a document does.

With `add_generation_prompt` the rendering ends with `<|assistant|>`, so generation continues
with the assistant's reply and stops at `<|end|>`. The Jinja template (saved in
`tokenizer_config.json` for `transformers.apply_chat_template`) and `render` (plain Python, for
llmpipe's own code and tests) produce the same string.
"""

from __future__ import annotations

from llmpipe.tokenizer.special import ASSISTANT, END_OF_TURN, EOT, SYSTEM, USER

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

CHAT_TEMPLATE = (
    "{{- '" + EOT + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_OF_TURN + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The same string as the Jinja template, without Jinja."""
    parts = [EOT]
    for message in messages:
        if message["role"] not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role: {message['role']}")
        parts.append(ROLE_TOKENS[message["role"]] + message["content"] + END_OF_TURN)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)
