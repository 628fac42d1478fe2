"""Deterministic train/eval split by content hash, shared by every dataset the pipeline writes."""

import hashlib

from rlhf_components.core.config import StrictModel


class SplitDataset(StrictModel):
    """Where a step wrote its train/eval split, what it quarantined, and the dataset's version."""

    train: str
    eval: str
    quarantine: str
    manifest: str
    content_hash: str
    counts: dict[str, int]


def is_eval(record_id: str, eval_fraction: float) -> bool:
    """A record stays on its side of the split across runs, sources and machines."""
    bucket = int(hashlib.sha256(f"split:{record_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < eval_fraction
