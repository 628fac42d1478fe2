"""The GRPO demo's arithmetic task: every question once, annotator habits as specified, and a hidden checker
that solves each question from its own text."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from rlhf_components.core.errors import UserError
from rlhf_components.demo import DemoAssetsSpec, resolve_judge
from rlhf_components.demo.arithmetic import (
    OFF_BY_ONE_RATE,
    PHRASINGS,
    arithmetic_score,
    build_corpus,
    build_problems,
)


def test_every_question_is_a_distinct_prompt_with_its_result() -> None:
    problems = build_problems()
    assert len(problems) == len({q for q, _ in problems}) == 4 * (100 + 55)
    for question, answer in problems:
        a, op, b = re.search(r"(\d) ([+-]) (\d)", question).groups()  # type: ignore[union-attr]
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_the_checker_wants_the_number_alone() -> None:
    judge = resolve_judge("demo-arithmetic")
    assert judge("compute 7 + 8 .", " 15") == judge("what is 9 - 3 ?", "6\n") == 1.0
    for wrong in (" 14", " the answer is 15 .", " 15 .", "", " 150"):
        assert judge("compute 7 + 8 .", wrong) == 0.0
    with pytest.raises(UserError, match="demo-arithmetic judge needs arithmetic questions"):
        arithmetic_score("Review of the diner:", " 3")


def _shape(phrasing: str) -> str:
    return phrasing.format(a="#", op="+", b="#")


def test_the_corpus_has_each_phrasings_habit() -> None:
    corpus = build_corpus(8000, seed=0)
    bare: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    wrong = 0
    for question, answer in corpus:
        phrasing = next(
            p for p, _ in PHRASINGS if re.sub(r"\d", "#", question.replace("-", "+")) == _shape(p)
        )
        seen[phrasing] += 1
        bare[phrasing] += bool(re.fullmatch(r" \d+", answer))
        number = int(re.search(r"\d+", answer).group())  # type: ignore[union-attr]
        wrong += arithmetic_score(question, str(number)) == 0.0
    for phrasing, rate in PHRASINGS:
        assert bare[phrasing] / seen[phrasing] == pytest.approx(rate, abs=0.04), phrasing
    # Off by one in either direction, except below zero: a little under the rate.
    assert wrong / len(corpus) == pytest.approx(OFF_BY_ONE_RATE, abs=0.02)
    assert build_corpus(50, seed=1) == build_corpus(50, seed=1) != build_corpus(50, seed=2)


def test_the_arithmetic_task_has_no_chat_form() -> None:
    with pytest.raises(ValueError, match="chat: the arithmetic task has plain-text prompts only"):
        DemoAssetsSpec(task="arithmetic", chat=True)
    assert DemoAssetsSpec(task="arithmetic").spec_hash() != DemoAssetsSpec().spec_hash()
