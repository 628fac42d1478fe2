"""A dataset version's training pairs, made once per version and pair settings and kept beside the version:

    v000003/pairs-<settings digest>/train.jsonl, eval.jsonl
    v000003/pairs-<settings digest>/summary.json     written last: the pairs are complete once it exists

Pairs are the majority votes over every judgement of the version (quality.py), split train/eval by a hash of
the pair, made from the JudgementIndex one pair's votes at a time and written as they come. A rerun that
finds no new feedback points its outputs at the pairs already made instead of reading the dataset again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import ValidationError

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.core.splits import is_eval
from rlhf_components.ingest_feedback import quality, store
from rlhf_components.ingest_feedback.index import JudgementIndex

FORMAT = 1


class PairSettings(StrictModel):
    """The settings that decide which pairs a version's judgements make."""

    rating_min_difference: float
    max_rating_pairs: int
    tie_policy: Literal["drop", "coin"]
    eval_fraction: float

    def folder(self, root: str, version: int) -> str:
        digest = hashlib.sha256(json.dumps([FORMAT, self.model_dump()], sort_keys=True).encode()).hexdigest()
        return storage.join(store.version_dir(root, version), f"pairs-{digest[:16]}")


class PairSet(StrictModel):
    train: str
    eval: str
    content_hash: str
    """of the pairs, in order, without their sources"""
    dataset_content_hash: str
    counts: dict[str, int]
    agreement: quality.Agreement


def made(root: str, version: int, settings: PairSettings) -> PairSet | None:
    """The pairs made from this version with these settings before, or None (also when their files are no
    longer all there)."""
    summary = storage.join(settings.folder(root, version), "summary.json")
    if not storage.exists(summary):
        return None
    try:
        pairs = PairSet.model_validate_json(storage.read_bytes(summary))
    except ValidationError:
        return None  # written by another release: made again
    return pairs if storage.exists(pairs.train) and storage.exists(pairs.eval) else None


def make(root: str, version: int, settings: PairSettings, index: JudgementIndex) -> PairSet:
    """The pairs of the version whose judgements `index` holds, written beside it."""
    folder = settings.folder(root, version)
    index.start_votes()
    rating_pairs_capped = 0
    for scale in index.rating_scales():
        votes, capped = quality.pairs_from_ratings(
            scale, settings.rating_min_difference, settings.max_rating_pairs
        )
        rating_pairs_capped += capped
        index.add_votes(votes)
    tally = quality.AgreementTally()
    pairs_hash = storage.ContentHash()
    ties_dropped = simulated = 0
    with (
        storage.writing_jsonl(storage.join(folder, "train.jsonl")) as train,
        storage.writing_jsonl(storage.join(folder, "eval.jsonl")) as evaluation,
    ):
        for key, votes in index.vote_groups():
            tally.add(votes)
            preference = quality.decide(key, votes, settings.tie_policy)
            if preference is None:
                ties_dropped += 1
                continue
            pairs_hash.add(preference.model_dump(exclude={"sources"}))
            simulated += preference.simulated
            (evaluation if is_eval(preference.id, settings.eval_fraction) else train).write(
                preference.model_dump()
            )
    judgements = index.counts()
    pairs = PairSet(
        train=storage.join(folder, "train.jsonl"),
        eval=storage.join(folder, "eval.jsonl"),
        content_hash=pairs_hash.hexdigest(),
        dataset_content_hash=index.content_hash(),
        counts={
            "judgements": judgements["pair_judgements"] + judgements["ratings"],
            "pairs": train.rows + evaluation.rows,
            "ties_dropped": ties_dropped,
            "train": train.rows,
            "eval": evaluation.rows,
            "simulated": simulated,
            "rating_pairs_capped": rating_pairs_capped,
        },
        agreement=tally.result(),
    )
    storage.write_text(storage.join(folder, "summary.json"), pairs.model_dump_json(indent=2))
    return pairs
