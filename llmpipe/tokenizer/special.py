"""Special tokens shared by the tokenizer, the shards, the model and the chat template.

They take the first ids, in this order, so `EOT_ID == 0` in every tokenizer llmpipe trains.
"""

from __future__ import annotations

from tokenizers import Tokenizer

EOT = "<|endoftext|>"  # separates documents in the token stream
PAD = "<|pad|>"
UNK = "<|unk|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"

SPECIAL_TOKENS = [EOT, PAD, UNK, SYSTEM, USER, ASSISTANT, END_OF_TURN]
EOT_ID, PAD_ID = 0, 1
END_OF_TURN_ID = SPECIAL_TOKENS.index(END_OF_TURN)


def ordinary(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that encodes special-token strings in its input as plain text (tiktoken's
    `encode_ordinary`): a document or a chat message that reads `<|end|>` must not end a turn."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy
