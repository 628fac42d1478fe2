"""The verifiable demo task: small arithmetic, answered with the number alone, checked exactly.

The SFT corpus is written by annotators with habits: each phrasing of a question gets the bare number with
its own probability, and otherwise the number inside a sentence ("the answer is 7 ."); a few answers are off
by one. The SFT policy therefore knows the sums but, for some phrasings, usually wraps them. GRPO with an
exact-match reward (the prompt rows' `answer` column) must teach it to answer with the number alone, on
phrasings and facts it was not trained on. `arithmetic_score` is the hidden checker evaluate uses: it solves
the question from the prompt text itself, independently of the dataset's `answer` column.
"""

from __future__ import annotations

import random
import re

from ..core.errors import UserError

ARITHMETIC_JUDGE_NAME = "demo-arithmetic"

# (phrasing, probability that an annotator answers with the bare number): the annotators' habits.
PHRASINGS = (
    ("what is {a} {op} {b} ?", 0.7),
    ("{a} {op} {b} = ?", 0.6),
    ("compute {a} {op} {b} .", 0.15),
    ("please tell me {a} {op} {b} .", 0.1),
)
SENTENCES = ("the answer is {x} .", "it is {x} .", "that makes {x} .")
OFF_BY_ONE_RATE = 0.1

_QUESTION = re.compile(r"(\d+) ([+\-]) (\d+)")


def facts() -> list[tuple[int, str, int]]:
    """Every (a, op, b) of the task: sums of two digits, and differences of two digits that are not
    negative."""
    sums = [(a, "+", b) for a in range(10) for b in range(10)]
    differences = [(a, "-", b) for a in range(10) for b in range(a + 1)]
    return sums + differences


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def build_problems() -> list[tuple[str, str]]:
    """(question, answer) for every fact in every phrasing: 620 distinct prompts."""
    return [
        (phrasing.format(a=a, op=op, b=b), str(solve(a, op, b)))
        for phrasing, _ in PHRASINGS
        for a, op, b in facts()
    ]


def build_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (question, answer text) pairs as the annotators wrote them (leading space, as a continuation)."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(n):
        phrasing, bare_rate = rng.choice(PHRASINGS)
        a, op, b = rng.choice(facts())
        result = solve(a, op, b)
        if rng.random() < OFF_BY_ONE_RATE:
            result = max(0, result + rng.choice((-1, 1)))
        text = str(result) if rng.random() < bare_rate else rng.choice(SENTENCES).format(x=result)
        corpus.append((phrasing.format(a=a, op=op, b=b), " " + text))
    return corpus


def arithmetic_score(prompt: str, response: str) -> float:
    """1 when the response is exactly the question's result (surrounding whitespace aside), else 0."""
    question = _QUESTION.search(prompt)
    if question is None:
        raise UserError(f"the {ARITHMETIC_JUDGE_NAME} judge needs arithmetic questions, not {prompt!r}")
    a, op, b = int(question.group(1)), question.group(2), int(question.group(3))
    return float(response.strip() == str(solve(a, op, b)))
