"""generate_candidates: configuration, inputs and outputs; it writes `Candidate`s and `AnnotationTask`s.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_components.core.config import ModelStep, SamplingConfig, StrictModel


class Config(ModelStep):
    samples_per_prompt: int = Field(default=2, ge=2, description="K candidates per prompt")
    max_prompts: int | None = Field(default=None, ge=1)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0))
    max_prompt_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)


class Inputs(StrictModel):
    policy: str = Field(description="checkpoint dir, s3:// prefix or models:/name@alias")
    prompts: str = Field(description="JSONL of {id, prompt} records (collect_prompts' train split)")
    inbox: str = Field(description="feedback inbox: tasks are written under tasks/")


class Outputs(StrictModel):
    candidates: str
    tasks: str
    label_studio_tasks: str
    label_studio_config: str = Field(description="the labelling config the Label Studio tasks are made for")
    num_candidates: int
    num_tasks: int
