"""collect_prompts: configuration, inputs and outputs; it writes `PromptRecord`s.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_components.core.config import StrictModel
from rlhf_components.core.splits import SplitDataset


class Config(StrictModel):
    sources: list[str] = Field(
        min_length=1, description="files, prefixes or saved HF datasets, local or s3://"
    )
    text_field: str = Field(default="prompt", description="column/key that holds the prompt text")
    columns: list[str] = Field(
        default_factory=list,
        description="other columns kept with each prompt, e.g. the answer a GRPO reward function checks; a "
        "row without one of them is quarantined",
    )
    min_chars: int = Field(default=1, ge=1)
    max_chars: int = Field(default=2000, ge=1)
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_prompts: int | None = Field(default=None, ge=1, description="keep at most this many (train+eval)")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> Config:
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        reserved = {"id", "prompt", "source", "messages", self.text_field} & set(self.columns)
        if reserved:
            raise ValueError(f"columns: {sorted(reserved)} already name the prompt record's own fields")
        return self


class Inputs(StrictModel):
    """collect_prompts is a source step: everything it reads is named in its config."""


class Outputs(SplitDataset):
    """The prompt dataset: train/eval JSONL, quarantine, manifest, version hash."""
