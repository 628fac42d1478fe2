"""A synthetic grammar of short restaurant and product reviews.

Every function takes its randomness from an explicit ``random.Random`` (or a seed), never from the
global generator, so a corpus is a pure function of its seed.

A review is one or two short sentences whose sentiment slots are filled from positive, neutral and
negative word pools. Each slot draws its polarity independently, weighted by the review's sentiment in
[-1, 1]: at +1 a review is mostly positive with some neutral words, at 0 it is an even mix, at -1 mostly
negative. Responses start with a single space so that ``prompt + response`` tokenizes to exactly the
prompt's tokens followed by the response's tokens under a byte-level BPE.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from typing import Literal

Kind = Literal["restaurant", "product"]
KINDS: tuple[Kind, ...] = ("restaurant", "product")

_RESTAURANT_TEMPLATES = (
    "Review of the {subject} {place}:",
    "My review of the {subject} {place}:",
    "What I thought of the {subject} {place}:",
)
_RESTAURANTS = (
    "noodle bar",
    "pizza place",
    "bakery",
    "coffee shop",
    "taco stand",
    "sushi bar",
    "steakhouse",
    "diner",
    "curry house",
    "bistro",
)
_PLACES = (
    "on Main Street",
    "downtown",
    "near the station",
    "by the river",
    "on the corner",
    "at the mall",
)
_PRODUCT_TEMPLATES = (
    "Review of the {subject} {origin}:",
    "My review of the {subject} {origin}:",
    "What I thought of the {subject} {origin}:",
)
_PRODUCTS = (
    "wireless headphones",
    "coffee maker",
    "desk lamp",
    "running shoes",
    "backpack",
    "phone case",
    "blender",
    "office chair",
    "water bottle",
    "keyboard",
)
_ORIGINS = (
    "I bought last month",
    "from the online store",
    "I got as a gift",
)

# (noun phrase, verb) pairs keep subject-verb agreement without a morphology engine.
_ASPECTS: dict[Kind, tuple[tuple[str, str], ...]] = {
    "restaurant": (
        ("food", "was"),
        ("service", "was"),
        ("staff", "were"),
        ("prices", "were"),
        ("portions", "were"),
        ("coffee", "was"),
        ("atmosphere", "was"),
        ("music", "was"),
        ("wait", "was"),
        ("dessert", "was"),
    ),
    "product": (
        ("quality", "was"),
        ("size", "was"),
        ("build quality", "was"),
        ("price", "was"),
        ("design", "was"),
        ("colors", "were"),
        ("instructions", "were"),
        ("materials", "were"),
        ("packaging", "was"),
        ("delivery", "was"),
    ),
}

POSITIVE_ADJECTIVES = (
    "great",
    "excellent",
    "wonderful",
    "superb",
    "lovely",
    "fantastic",
    "perfect",
    "amazing",
    "pleasant",
    "outstanding",
)
NEUTRAL_ADJECTIVES = (
    "okay",
    "fine",
    "average",
    "ordinary",
    "standard",
    "acceptable",
    "typical",
    "normal",
)
NEGATIVE_ADJECTIVES = (
    "terrible",
    "awful",
    "poor",
    "disappointing",
    "bad",
    "horrible",
    "dreadful",
    "mediocre",
    "unpleasant",
    "lousy",
)
_INTENSIFIERS = ("", "", "really ", "quite ", "very ", "pretty ")
_OPENERS = ("Honestly,", "To be fair,", "As expected,", "I think", "In short,")

POSITIVE_VERDICTS = (
    "I loved it and will come back.",
    "Highly recommended.",
    "I would happily buy it again.",
    "What a delight.",
    "It was a real joy.",
)
NEUTRAL_VERDICTS = (
    "Nothing special either way.",
    "It did the job.",
    "Maybe I will try it again.",
    "It was what I expected.",
    "I have no strong feelings about it.",
)
NEGATIVE_VERDICTS = (
    "I hated it and will never return.",
    "Avoid it if you can.",
    "A complete waste of money.",
    "What a disappointment.",
    "It ruined my day.",
)


def _polarity(rng: random.Random, sentiment: float) -> int:
    """Draw +1, 0 or -1 for one slot; 15% neutral, the rest split by ``sentiment``."""
    u = rng.random()
    positive_share = 0.85 * (1.0 + sentiment) / 2.0
    if u < positive_share:
        return 1
    if u < 0.85:
        return -1
    return 0


def _adjective(rng: random.Random, sentiment: float) -> str:
    pools = {1: POSITIVE_ADJECTIVES, 0: NEUTRAL_ADJECTIVES, -1: NEGATIVE_ADJECTIVES}
    return rng.choice(_INTENSIFIERS) + rng.choice(pools[_polarity(rng, sentiment)])


def _verdict(rng: random.Random, sentiment: float) -> str:
    pools = {1: POSITIVE_VERDICTS, 0: NEUTRAL_VERDICTS, -1: NEGATIVE_VERDICTS}
    return rng.choice(pools[_polarity(rng, sentiment)])


def sample_kind(rng: random.Random) -> Kind:
    """Pick what is being reviewed: a restaurant or a product."""
    return rng.choice(KINDS)


def sample_prompt(rng: random.Random, kind: Kind | None = None) -> str:
    """A short review prompt ending with ``:``; of ``kind`` if given, else of a random kind."""
    kind = kind or sample_kind(rng)
    if kind == "restaurant":
        return rng.choice(_RESTAURANT_TEMPLATES).format(
            subject=rng.choice(_RESTAURANTS), place=rng.choice(_PLACES)
        )
    return rng.choice(_PRODUCT_TEMPLATES).format(subject=rng.choice(_PRODUCTS), origin=rng.choice(_ORIGINS))


def sample_review(rng: random.Random, sentiment: float, kind: Kind = "restaurant") -> str:
    """A 1-2 sentence continuation (8-20 words, leading space) with sentiment in [-1, 1]."""
    if not -1.0 <= sentiment <= 1.0:
        raise ValueError(f"sentiment must be in [-1, 1], got {sentiment}")
    (noun1, verb1), (noun2, verb2) = rng.sample(_ASPECTS[kind], 2)
    shape = rng.randrange(3)
    if shape == 0:
        first = (
            f"The {noun1} {verb1} {_adjective(rng, sentiment)} and "
            f"the {noun2} {verb2} {_adjective(rng, sentiment)}."
        )
        add_second = rng.random() < 0.5
    else:
        opening = "The" if shape == 1 else f"{rng.choice(_OPENERS)} the"
        first = f"{opening} {noun1} {verb1} {_adjective(rng, sentiment)}."
        add_second = True
    sentences = [first]
    if add_second:
        if rng.random() < 0.5:
            sentences.append(_verdict(rng, sentiment))
        else:
            sentences.append(f"Overall it was {_adjective(rng, sentiment)}.")
    review = " " + " ".join(sentences)
    # Short shapes plus short verdicts can fall under 8 words; a second verdict restores the length.
    if len(review.split()) < 8:
        review += " " + _verdict(rng, sentiment)
    return review


def build_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, continuation) pairs with sentiments evenly spaced over [-1, 1], shuffled.

    Evenly spaced rather than random sentiments keep the corpus exactly balanced for any ``n``, so a
    policy trained on it starts with a neutral mean gold score.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    sentiments = [-1.0 + 2.0 * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    rng.shuffle(sentiments)
    corpus = []
    for sentiment in sentiments:
        kind = sample_kind(rng)
        corpus.append((sample_prompt(rng, kind), sample_review(rng, sentiment, kind)))
    return corpus


SYSTEM_PROMPTS = (
    "You write short reviews.",
    "You are a reviewer. Be brief.",
    "Write one short review, one or two sentences.",
)


def as_conversation(prompt: str, rng: random.Random) -> list[dict[str, str]]:
    """The chat demo's form of a prompt: a system turn from SYSTEM_PROMPTS, then the prompt as the user's."""
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, {"role": "user", "content": prompt}]


def build_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts drawn with replacement (the grammar has 270 distinct prompts)."""
    rng = random.Random(seed)
    return [sample_prompt(rng) for _ in range(n)]


def _alternatives(options: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(option) for option in options) + ")"


def _review_pattern() -> re.Pattern[str]:
    adjective = (
        _alternatives(i for i in _INTENSIFIERS if i)
        + "?"
        + _alternatives(POSITIVE_ADJECTIVES + NEUTRAL_ADJECTIVES + NEGATIVE_ADJECTIVES)
    )
    aspect = _alternatives(f"{noun} {verb}" for pairs in _ASPECTS.values() for noun, verb in pairs)
    verdict = (
        _alternatives(POSITIVE_VERDICTS + NEUTRAL_VERDICTS + NEGATIVE_VERDICTS)
        + f"|Overall it was {adjective}\\."
    )
    two_aspects = f"The {aspect} {adjective} and the {aspect} {adjective}\\.(?: (?:{verdict}))?"
    one_aspect = f"(?:The|{_alternatives(_OPENERS)} the) {aspect} {adjective}\\.(?: (?:{verdict})){{1,2}}"
    return re.compile(f" (?:{two_aspects}|{one_aspect})")


_REVIEW_PATTERN = _review_pattern()


def matches_grammar(response: str) -> bool:
    """Whether ``response`` is a sentence sequence this grammar can produce.

    A fluency check for generated text: a policy that drifts off the grammar (reward hacking,
    degenerate text) fails it. Slightly permissive: it does not check that the two aspects differ
    or that they belong to the same kind.
    """
    return _REVIEW_PATTERN.fullmatch(response) is not None
