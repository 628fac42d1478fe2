"""evaluate: configuration, inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_components.core.config import ModelStep, SamplingConfig, StrictModel


class Config(ModelStep):
    max_prompts: int = Field(default=128, ge=1)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.01),
        description="the answers that are judged: near-greedy, each policy's best answer",
    )
    kl_sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="a separate sampled pass for the KL to the reference, at PPO's sampling temperature",
    )
    max_prompt_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)
    bootstrap_samples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    gold_judge: str | None = Field(default=None, description="a programmatic judge, e.g. demo-gold-sentiment")


class Inputs(StrictModel):
    candidate: str
    reference: str
    champion: str | None = Field(default=None, description="the current production policy, if any")
    reward_model: str | None = Field(default=None, description="none in the DPO pipeline: no rm_* metrics")
    prompts: str = Field(description="held-out prompts (collect_prompts' eval split)")


class Outputs(StrictModel):
    report: str
    metrics: dict[str, float]
