"""From judgements to training pairs, and how much the annotators agree.

- Ratings become pair judgements within one annotator and one prompt: the higher-rated answer is chosen
  when the ratings differ by at least `min_difference`, and equal ratings are a tie.
- Judgements of one pair (the same prompt and the same two answers) are votes. The majority wins; an even
  split or a tie majority is a tie, which the tie policy drops or turns into a pair of either direction by a
  fair coin seeded by the pair.
- Agreement is measured on pairs judged by two or more annotators: raw pairwise agreement and Krippendorff's
  alpha for nominal data (labels a, b, tie).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from itertools import combinations
from typing import Literal

from rlhf_components.core.config import StrictModel
from rlhf_components.core.records import Preference, prompt_key
from rlhf_components.ingest_feedback.formats import PairJudgement, RatingJudgement, pairs_by_gap

PairKey = tuple[str, str, str]


class AnnotatorStats(StrictModel):
    judgements: int
    ties: int
    shared_judgements: int
    """judgements of pairs someone else judged too"""
    agrees_with_others: float | None
    """over shared judgements: the fraction of the other annotators' votes that match this one's"""


class Agreement(StrictModel):
    shared_pairs: int
    raw_agreement: float | None
    krippendorff_alpha: float | None
    annotators: dict[str, AnnotatorStats]


def preference_id(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{chosen}\x00{rejected}".encode()).hexdigest()[:16]


def pairs_from_ratings(
    ratings: list[RatingJudgement], min_difference: float, max_pairs: int
) -> tuple[list[PairJudgement], int]:
    """(pair judgements from each annotator's ratings of one prompt's answers, how many a cap left out):
    n ratings hold n·(n−1)/2 pairs, so at most `max_pairs` per prompt and annotator are kept, answers
    closest in rank first."""
    by_scale: dict[tuple[str, str], list[RatingJudgement]] = defaultdict(list)
    for rating in ratings:
        by_scale[(prompt_key(rating.prompt), rating.annotator)].append(rating)
    pairs, capped = [], 0
    for group in by_scale.values():
        ranked = sorted(group, key=lambda r: (-r.rating, r.response))
        kept, left_out = pairs_by_gap(len(ranked), max_pairs)
        capped += left_out
        for i, j in kept:
            first, second = sorted((ranked[i], ranked[j]), key=lambda r: r.response)
            gap = first.rating - second.rating
            if 0 < abs(gap) < min_difference:
                continue
            choice: Literal["a", "b", "tie"] = "tie" if gap == 0 else "a" if gap > 0 else "b"
            pairs.append(
                PairJudgement(
                    prompt=first.prompt,
                    response_a=first.response,
                    response_b=second.response,
                    choice=choice,
                    annotator=first.annotator,
                    simulated=first.simulated or second.simulated,
                    sources=[*first.sources, *second.sources],
                )
            )
    return pairs, capped


def decide(
    key: PairKey, votes: list[PairJudgement], tie_policy: Literal["drop", "coin"]
) -> Preference | None:
    """The training pair the votes on one pair decide by majority, or None for a tie the policy drops."""
    prompt, a, b = key
    count = Counter(j.choice for j in votes)
    winner = "a" if count["a"] > count["b"] else "b" if count["b"] > count["a"] else "tie"
    if winner == "tie" or count["tie"] > max(count["a"], count["b"]):
        if tie_policy == "drop":
            return None
        coin = int(hashlib.sha256(f"tie:{prompt}\x00{a}\x00{b}".encode()).hexdigest()[:8], 16) % 2
        winner = "a" if coin == 0 else "b"
    chosen, rejected = (a, b) if winner == "a" else (b, a)
    return Preference(
        id=preference_id(prompt, chosen, rejected),
        prompt=votes[0].prompt,
        chosen=chosen,
        rejected=rejected,
        votes=len(votes),
        annotators=sorted({j.annotator for j in votes}),
        simulated=any(j.simulated for j in votes),
        sources=sorted({source for j in votes for source in j.sources}),
    )


class AgreementTally:
    """Agreement on pairs that two or more annotators judged (one vote per annotator: their first), counted
    one pair's votes at a time."""

    def __init__(self) -> None:
        self.shared_pairs = 0
        self.judged: Counter[str] = Counter()
        self.ties: Counter[str] = Counter()
        self.shared: Counter[str] = Counter()
        self.pairings: Counter[str] = Counter()  # (this annotator, another) label pairs on shared pairs
        self.matches: Counter[str] = Counter()
        self.agreeing = self.compared = 0
        self.coincidences = Coincidences()

    def add(self, votes: list[PairJudgement]) -> None:
        labels: dict[str, str] = {}
        for vote in votes:
            labels.setdefault(vote.annotator, vote.choice)
            self.judged[vote.annotator] += 1
            self.ties[vote.annotator] += vote.choice == "tie"
        if len(labels) < 2:
            return
        self.shared_pairs += 1
        self.shared.update(labels.keys())
        self.coincidences.add(list(labels.values()))
        for (first, first_label), (second, second_label) in combinations(labels.items(), 2):
            self.compared += 1
            self.agreeing += first_label == second_label
            for annotator in (first, second):
                self.pairings[annotator] += 1
                self.matches[annotator] += first_label == second_label

    def result(self) -> Agreement:
        stats = {
            annotator: AnnotatorStats(
                judgements=self.judged[annotator],
                ties=self.ties[annotator],
                shared_judgements=self.shared[annotator],
                agrees_with_others=(
                    self.matches[annotator] / self.pairings[annotator] if self.pairings[annotator] else None
                ),
            )
            for annotator in sorted(self.judged)
        }
        return Agreement(
            shared_pairs=self.shared_pairs,
            raw_agreement=self.agreeing / self.compared if self.compared else None,
            krippendorff_alpha=self.coincidences.alpha(),
            annotators=stats,
        )


class Coincidences:
    """Krippendorff's α for nominal data, α = 1 − D_o/D_e, from the coincidence matrix of the pairable
    values, built one unit (the labels of one pair) at a time."""

    def __init__(self) -> None:
        self.matrix: defaultdict[tuple[str, str], float] = defaultdict(float)

    def add(self, labels: list[str]) -> None:
        m = len(labels)
        if m < 2:
            return
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            self.matrix[(labels[i], labels[j])] += 1 / (m - 1)

    def alpha(self) -> float | None:
        """None when α is undefined: fewer than two pairable values, or every value the same (no expected
        disagreement)."""
        totals: defaultdict[str, float] = defaultdict(float)
        for (label, _), weight in self.matrix.items():
            totals[label] += weight
        n = sum(totals.values())
        if n < 2:
            return None
        observed = sum(weight for (c, k), weight in self.matrix.items() if c != k) / n
        expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k) / (n * (n - 1))
        if expected == 0:
            return None
        return 1.0 - observed / expected
