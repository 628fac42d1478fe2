"""ingest_feedback: configuration, inputs, outputs and records.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_components.core.config import StrictModel
from rlhf_components.core.splits import SplitDataset


class Config(StrictModel):
    simulated_annotator: str | None = Field(
        default=None,
        description="judge name that labels this run's tasks (demos/tests only), e.g. demo-gold-sentiment",
    )
    max_invalid_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)


class Inputs(StrictModel):
    inbox: str
    tasks: str | None = Field(
        default=None, description="this run's annotation tasks (for the simulated annotator)"
    )


class Preference(StrictModel):
    id: str
    prompt: str
    chosen: str
    rejected: str
    annotator: str
    simulated: bool
    source: str


class Outputs(SplitDataset):
    """The preference dataset: train/eval JSONL, quarantine, manifest, version hash."""
