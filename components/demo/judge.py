"""The demo's hidden gold judge: a deterministic lexicon sentiment score of a response.

It plays the human annotators. The reward model never sees this function, only pairwise labels derived
from it, so how far PPO moves the gold score measures how well preferences were learned and optimized.
`resolve_judge` finds a judge by the name a config gives (ingest_feedback's simulated annotator, evaluate's
gold judge).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rlhf_components.core.errors import UserError
from rlhf_components.demo.arithmetic import ARITHMETIC_JUDGE_NAME, arithmetic_score

Judge = Callable[[str, str], float]
"""(prompt, response) → score, higher is better; the simulated annotator and evaluate find judges by name."""

GOLD_JUDGE_NAME = "demo-gold-sentiment"

# Kept independent of the grammar's pools on purpose: the judge is the annotators' taste, not the
# generator's; tests check that the two agree on every grammar phrase.
POSITIVE_WORDS = frozenset(
    {
        "great", "excellent", "wonderful", "superb", "lovely", "fantastic", "perfect", "amazing",
        "pleasant", "outstanding", "loved", "love", "recommended", "happily", "delight", "good",
        "best", "joy",
    }
)  # fmt: skip
NEGATIVE_WORDS = frozenset(
    {
        "terrible", "awful", "poor", "disappointing", "bad", "horrible", "dreadful", "mediocre",
        "unpleasant", "lousy", "hated", "hate", "never", "avoid", "waste", "disappointment",
        "ruined", "worst",
    }
)  # fmt: skip

# A run of the same word longer than this is degenerate text, not emphasis.
MAX_REPEAT_RUN = 3
REPETITION_PENALTY = 0.5
EMPTY_SCORE = -1.0

_WORD = re.compile(r"[a-z']+")


def _longest_run(words: list[str]) -> int:
    longest = run = 0
    previous = None
    for word in words:
        run = run + 1 if word == previous else 1
        longest = max(longest, run)
        previous = word
    return longest


def gold_score(prompt: str, response: str) -> float:
    """Sentiment of ``response`` in [-1, 1]: (pos - neg) / (pos + neg + 1), penalized if degenerate.

    ``prompt`` is accepted so the judge has the annotator interface (prompt, answer) -> score; the
    demo prompts carry no sentiment, so it does not affect the score.
    """
    words = _WORD.findall(response.lower())
    if not words:
        return EMPTY_SCORE
    positive = sum(word in POSITIVE_WORDS for word in words)
    negative = sum(word in NEGATIVE_WORDS for word in words)
    score = (positive - negative) / (positive + negative + 1)
    if _longest_run(words) > MAX_REPEAT_RUN:
        score -= REPETITION_PENALTY
    return max(-1.0, min(1.0, score))


JUDGES: dict[str, Judge] = {GOLD_JUDGE_NAME: gold_score, ARITHMETIC_JUDGE_NAME: arithmetic_score}


def resolve_judge(name: str) -> Judge:
    if name not in JUDGES:
        raise UserError(f"unknown judge {name!r}; available: {', '.join(sorted(JUDGES))}")
    return JUDGES[name]
