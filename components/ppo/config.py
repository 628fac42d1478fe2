"""PPO: configuration (defaults from the N+ implementation-details paper), inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_components.core.config import SamplingConfig, StrictModel
from rlhf_components.core.trainer_config import TrainedPolicy, TrainerConfig


class Config(TrainerConfig):
    total_episodes: int = Field(default=1024, ge=1, description="responses sampled over the whole run")
    rollout_batch_size: int = Field(
        default=64, ge=1, description="episodes per PPO iteration, over all workers together"
    )
    num_minibatches: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    ppo_epochs: int = Field(default=4, ge=1)
    learning_rate: float = Field(default=3e-6, gt=0.0)
    adam_eps: float = Field(default=1e-5, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW's decoupled weight decay")
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    cliprange: float = Field(default=0.2, gt=0.0)
    cliprange_value: float = Field(default=0.2, gt=0.0)
    vf_coef: float = Field(default=0.1, ge=0.0)
    kl_coef: float = Field(default=0.05, ge=0.0, description="β: initial value for the adaptive controller")
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = Field(default=6.0, gt=0.0, description="adaptive controller: target KL per sequence")
    kl_horizon: int = Field(default=10000, ge=1, description="adaptive controller: horizon in episodes")
    whiten_rewards: bool = False
    missing_eos_penalty: float = Field(default=1.0, ge=0.0, description="subtracted from the score")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    max_prompt_tokens: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _batches_divide(self) -> Config:
        micro = self.workers * self.num_minibatches * self.gradient_accumulation_steps
        if self.rollout_batch_size % micro:
            raise ValueError(
                "rollout_batch_size must be divisible by workers × num_minibatches × "
                f"gradient_accumulation_steps ({self.rollout_batch_size} % {micro} != 0)"
            )
        if self.lora is not None and self.lora.dropout:
            raise ValueError(
                f"lora.dropout must be 0 in PPO (it is {self.lora.dropout}): the log-probs of a rollout and "
                "of its update must come from the same function"
            )
        return self


class Inputs(StrictModel):
    policy: str = Field(
        description="initial policy checkpoint (also the reference unless `reference` is set)"
    )
    reference: str | None = None
    reward_model: str
    prompts: str = Field(description="JSONL of {prompt} records")


class Outputs(TrainedPolicy):
    iterations: int
    final_score: float
    final_kl: float
