"""ingest_feedback: configuration, inputs and outputs; it writes `Preference` pairs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_components.core.config import StrictModel
from rlhf_components.core.splits import SplitDataset


class Config(StrictModel):
    simulated_annotator: str | None = Field(
        default=None,
        description="judge name that labels this run's tasks (demos/tests only), e.g. demo-gold-sentiment",
    )
    sources: list[str] = Field(
        default_factory=list,
        description="more feedback files or prefixes (local or s3://) besides <feedback_inbox>/labels/",
    )
    dataset: str | None = Field(
        default=None, description="the cumulative dataset and its ledger; default <feedback_inbox>/dataset"
    )
    max_invalid_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    tie_policy: Literal["drop", "coin"] = Field(
        default="drop", description="a pair whose votes tie: drop it, or pick a side by a fair coin"
    )
    rating_min: float = 1.0
    rating_max: float = 5.0
    rating_min_difference: float = Field(
        default=1.0, gt=0.0, description="Likert: the rating gap that makes a pair (equal ratings: a tie)"
    )
    max_pairs_per_ranking: int = Field(
        default=1000,
        ge=1,
        description="a ranking of K answers holds K(K-1)/2 pairs: keep at most this many (neighbours first); "
        "the rest are counted as capped",
    )
    max_rating_pairs: int = Field(
        default=1000,
        ge=1,
        description="pairs from one annotator's ratings of one prompt's answers, at most (closest first)",
    )

    @model_validator(mode="after")
    def _rating_range(self) -> Config:
        if self.rating_min >= self.rating_max:
            raise ValueError(f"rating_min ({self.rating_min}) must be below rating_max ({self.rating_max})")
        return self


class Inputs(StrictModel):
    inbox: str
    tasks: str | None = Field(
        default=None, description="this run's annotation tasks (for the simulated annotator)"
    )


class Outputs(SplitDataset):
    """The training pairs of the dataset version this run ends on (train/eval JSONL, kept beside that
    version and shared by every run that ends on it with the same pair settings), this run's quarantine and
    manifest, and the version itself."""

    dataset_version: int
    dataset_manifest: str
