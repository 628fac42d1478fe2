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


def pair_key(judgement: PairJudgement) -> PairKey:
    return prompt_key(judgement.prompt), judgement.response_a, judgement.response_b


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


def preferences(
    judgements: list[PairJudgement], tie_policy: Literal["drop", "coin"]
) -> tuple[list[Preference], int]:
    """(training pairs by majority vote, how many pairs ended in a tie and were dropped)."""
    votes: dict[PairKey, list[PairJudgement]] = defaultdict(list)
    for judgement in judgements:
        votes[pair_key(judgement)].append(judgement)
    kept, dropped = [], 0
    for (prompt, a, b), group in sorted(votes.items()):
        count = Counter(j.choice for j in group)
        winner = "a" if count["a"] > count["b"] else "b" if count["b"] > count["a"] else "tie"
        if winner == "tie" or count["tie"] > max(count["a"], count["b"]):
            if tie_policy == "drop":
                dropped += 1
                continue
            coin = int(hashlib.sha256(f"tie:{prompt}\x00{a}\x00{b}".encode()).hexdigest()[:8], 16) % 2
            winner = "a" if coin == 0 else "b"
        chosen, rejected = (a, b) if winner == "a" else (b, a)
        kept.append(
            Preference(
                id=preference_id(prompt, chosen, rejected),
                prompt=group[0].prompt,
                chosen=chosen,
                rejected=rejected,
                votes=len(group),
                annotators=sorted({j.annotator for j in group}),
                simulated=any(j.simulated for j in group),
                sources=sorted({source for j in group for source in j.sources}),
            )
        )
    return kept, dropped


def agreement(judgements: list[PairJudgement]) -> Agreement:
    """Agreement on pairs that two or more annotators judged (one vote per annotator: their first)."""
    units: dict[PairKey, dict[str, str]] = defaultdict(dict)
    for judgement in judgements:
        units[pair_key(judgement)].setdefault(judgement.annotator, judgement.choice)
    shared = [labels for labels in units.values() if len(labels) > 1]
    judged, ties = (
        Counter(j.annotator for j in judgements),
        Counter(j.annotator for j in judgements if j.choice == "tie"),
    )
    shared_count: Counter[str] = Counter()
    pairings: Counter[str] = Counter()  # (this annotator, another) label pairs on shared pairs
    matches: Counter[str] = Counter()
    agreeing = total = 0
    for labels in shared:
        for (first, first_label), (second, second_label) in combinations(labels.items(), 2):
            total += 1
            agreeing += first_label == second_label
            for annotator in (first, second):
                pairings[annotator] += 1
                matches[annotator] += first_label == second_label
        shared_count.update(labels.keys())
    stats = {
        annotator: AnnotatorStats(
            judgements=judged[annotator],
            ties=ties[annotator],
            shared_judgements=shared_count[annotator],
            agrees_with_others=matches[annotator] / pairings[annotator] if pairings[annotator] else None,
        )
        for annotator in sorted(judged)
    }
    return Agreement(
        shared_pairs=len(shared),
        raw_agreement=agreeing / total if total else None,
        krippendorff_alpha=krippendorff_alpha_nominal([list(labels.values()) for labels in shared]),
        annotators=stats,
    )


def krippendorff_alpha_nominal(units: list[list[str]]) -> float | None:
    """α = 1 − D_o/D_e from the coincidence matrix of the pairable values (units with two or more labels).

    None when it is undefined: fewer than two pairable values, or every value the same (no expected
    disagreement).
    """
    coincidences: defaultdict[tuple[str, str], float] = defaultdict(float)
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidences[(labels[i], labels[j])] += 1 / (m - 1)
    totals: defaultdict[str, float] = defaultdict(float)
    for (label, _), weight in coincidences.items():
        totals[label] += weight
    n = sum(totals.values())
    if n < 2:
        return None
    observed = sum(weight for (c, k), weight in coincidences.items() if c != k) / n
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k) / (n * (n - 1))
    if expected == 0:
        return None
    return 1.0 - observed / expected
