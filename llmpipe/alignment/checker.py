"""Verifiable tasks: their questions and answers, and the one checker of a reply.

`check(task, answer_text, expected)` is what SFT's held-out task accuracy, PPO's `checker`
reward and evaluation all call. A reply is normalised leniently (surrounding whitespace, quotes
and a final full stop; for numbers, the first integer in it) and then must equal the answer.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

_INTEGER = re.compile(r"-?\d+")


def _strip(text: str) -> str:
    return text.strip().strip("\"'`").strip().rstrip(".").strip()


def normalise(task: str, text: str) -> str:
    """The part of a reply that is compared with the answer."""
    if task in NUMERIC:
        match = _INTEGER.search(text)
        return match.group() if match else ""
    return _strip(text)


def check(task: str, answer_text: str, expected: str) -> bool:
    """True when the reply `answer_text` to a `task` question is the `expected` answer."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return normalise(task, answer_text) == normalise(task, str(expected))


@dataclass(frozen=True)
class Question:
    task: str
    question: str
    answer: str
    wrong: str  # a plausible wrong answer: the rejected side of a preference pair


WORDS = ("apple river stone cloud tiger python lambda window garden silver rocket planet button "
         "candle mirror forest bridge castle dragon engine falcon harbor island jungle kettle ladder "
         "marble needle orange pencil quartz rabbit saddle tunnel velvet walnut yellow zebra").split()


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _arithmetic(op: str, symbol: str, fn: Callable[[int, int], int]):
    def make(rng: random.Random, max_operand: int) -> Question:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        right = fn(a, b)
        return Question(op, f"What is {a} {symbol} {b}?", str(right), str(right + rng.choice((-1, 1))))
    return make


def _reverse(rng: random.Random, _: int) -> Question:
    word = _word(rng)
    right = word[::-1]
    wrong = right[1:] + right[0] if len(set(word)) > 1 else right + right[0]  # a rotation: almost reversed
    return Question("reverse", f"Reverse the word '{word}'.", right, wrong)


def _uppercase(rng: random.Random, _: int) -> Question:
    words = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
    right = words.upper()
    return Question("uppercase", f"Write '{words}' in uppercase.", right, right[:-1] + right[-1].lower())


def _count(rng: random.Random, _: int) -> Question:
    """How often a letter occurs in a word (the letter is one of the word's, or another)."""
    word = _word(rng)
    letter = rng.choice(word if rng.random() < 0.8 else string.ascii_lowercase)
    right = word.count(letter)
    return Question("count", f"How many times does the letter '{letter}' occur in '{word}'?", str(right),
                    str(right + 1))


def _sort_words(rng: random.Random, _: int) -> Question:
    words = rng.sample(WORDS, rng.randint(3, 4))
    right = sorted(words)
    wrong = right[:]
    wrong[0], wrong[1] = wrong[1], wrong[0]
    return Question("sort_words", f"Sort these words alphabetically: {' '.join(words)}", " ".join(right),
                    " ".join(wrong))


GENERATORS: dict[str, Callable[[random.Random, int], Question]] = {
    "add": _arithmetic("add", "+", lambda a, b: a + b),
    "subtract": _arithmetic("subtract", "-", lambda a, b: a - b),
    "multiply": _arithmetic("multiply", "*", lambda a, b: a * b),
    "reverse": _reverse,
    "uppercase": _uppercase,
    "count": _count,
    "sort_words": _sort_words,
}
TASKS = tuple(GENERATORS)
NUMERIC = frozenset({"add", "subtract", "multiply", "count"})


def make_question(task: str, rng: random.Random, max_operand: int = 99) -> Question:
    return GENERATORS[task](rng, max_operand)
