"""Length-controlled win rate and distinct-n against hand-built cases and an independent float64 fit; the LLM
judge's verdict parsing and template check."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from rlhf_components.evaluate.config import JudgeConfig
from rlhf_components.evaluate.judge import UNPARSED, parse_verdict
from rlhf_components.evaluate.step import distinct_n, length_controlled_win_rate


def test_wins_explained_by_length_alone_are_worth_a_coin_flip() -> None:
    # The candidate wins exactly when its answer is longer, and is longer half of the time.
    gaps = [5.0, -5.0, 3.0, -3.0, 8.0, -8.0, 1.0, -1.0] * 4
    outcomes = [1.0 if gap > 0 else 0.0 for gap in gaps]
    assert sum(outcomes) / len(outcomes) == 0.5
    assert length_controlled_win_rate(outcomes, gaps) == pytest.approx(0.5, abs=1e-6)


def test_wins_at_equal_length_are_kept() -> None:
    outcomes = [1.0] * 9 + [0.0]
    lc = length_controlled_win_rate(outcomes, [0.0] * 10)
    assert lc == pytest.approx(0.9, abs=1e-2)


def test_length_control_discounts_wins_that_came_with_longer_answers() -> None:
    # Wins mostly with longer answers: the raw rate overstates the quality gain.
    gaps = [6.0, 5.0, 4.0, 7.0, 6.0, 5.0, -1.0, 0.0, 1.0, -2.0, 0.5, -0.5]
    outcomes = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    raw = sum(outcomes) / len(outcomes)
    lc = length_controlled_win_rate(outcomes, gaps)
    assert lc < raw

    # Independent reference: plain gradient ascent on the same ridge-penalised log-likelihood, in floats.
    scale = math.sqrt(sum((g - sum(gaps) / len(gaps)) ** 2 for g in gaps) / (len(gaps) - 1))
    a = b = 0.0
    for _ in range(200000):
        grad_a = grad_b = 0.0
        for y, g in zip(outcomes, gaps, strict=True):
            p = 1.0 / (1.0 + math.exp(-(a + b * g / scale)))
            grad_a += y - p
            grad_b += (y - p) * g / scale
        a += 0.05 * (grad_a - 1e-3 * a)
        b += 0.05 * (grad_b - 1e-3 * b)
    assert lc == pytest.approx(1.0 / (1.0 + math.exp(-a)), abs=1e-4)


def test_distinct_n_counts_unique_ngrams_over_all_answers() -> None:
    texts = ["the food was great", "the food was bad", "great great great"]
    # unigrams: the food was great the food was bad great great great → 11 total, 5 unique
    assert distinct_n(texts, 1) == pytest.approx(5 / 11)
    # bigrams: the food, food was, was great, the food, food was, was bad, great great ×2 → 8, 5 unique
    assert distinct_n(texts, 2) == pytest.approx(5 / 8)
    assert distinct_n([""], 2) == 0.0


def test_a_verdict_is_the_reply_or_its_first_word_before_punctuation() -> None:
    replies = ("A", " b.", "TIE", "Tie: both fine", "**B**", "A\nBecause it is kinder.", "(B)", "B - shorter")
    assert [parse_verdict(r) for r in replies] == ["A", "B", "TIE", "TIE", "B", "A", "B", "B"]
    unclear_replies = ("", "Answer A", "AB", "Both fine", "I think A", "A great place to eat", "B is better")
    for unclear in unclear_replies:
        assert parse_verdict(unclear) == UNPARSED, unclear


def test_a_judge_template_must_hold_all_three_fields() -> None:
    with pytest.raises(ValidationError, match=r"template: must contain \{second\}"):
        JudgeConfig(url="http://judge/v1", model="m", template="{prompt} {first}")
    with pytest.raises(ValidationError, match="url"):
        JudgeConfig(url="judge:8000", model="m")
