"""grpo: configuration (defaults after TRL's GRPOTrainer and the DAPO and Dr. GRPO papers), inputs and
outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_components.core.config import Reward, SamplingConfig, StrictModel
from rlhf_components.core.trainer_config import TrainedPolicy, TrainerConfig


class Config(TrainerConfig):
    rewards: list[Reward] = Field(
        default_factory=list,
        description="at least one, unless the run trains a reward model from feedback (grpo-feedback)",
    )
    trained_reward_model_weight: float = Field(
        default=1.0,
        description="grpo-feedback: the weight of the reward model trained from this run's feedback",
    )
    total_episodes: int = Field(default=1024, ge=1, description="completions sampled over the whole run")
    prompts_per_step: int = Field(default=16, ge=1, description="prompts per step, over all workers")
    num_generations: int = Field(default=4, ge=2, description="K: completions per prompt (one group)")
    advantage: Literal["grpo", "rloo"] = Field(
        default="grpo",
        description="grpo: reward − group mean (÷ group std with scale_rewards); rloo: leave-one-out",
    )
    scale_rewards: bool = Field(default=True, description="grpo: divide by the group's std")
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = "token"
    beta: float = Field(default=0.0, ge=0.0, description="KL weight; 0 loads no reference model")
    kl_in: Literal["loss", "reward"] = Field(
        default="loss", description="loss: β·k3 per token in the loss; reward: −β·Σ log π/π_ref in the reward"
    )
    num_iterations: int = Field(default=1, ge=1, description="μ: optimisation passes over each batch")
    num_minibatches: int = Field(default=1, ge=1, description="optimizer steps per pass")
    epsilon: float = Field(
        default=0.2, gt=0.0, description="clip range below (and above, unless epsilon_high)"
    )
    epsilon_high: float | None = Field(default=None, gt=0.0, description="clip range above (DAPO: 0.28)")
    mask_truncated_completions: bool = Field(
        default=False, description="completions that never ended contribute no loss"
    )
    learning_rate: float = Field(default=1e-6, gt=0.0)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0))
    max_prompt_tokens: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _groups_divide(self) -> Config:
        if self.prompts_per_step % self.workers:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be divisible by workers ({self.workers}): "
                "each worker answers whole groups"
            )
        episodes = self.prompts_per_step // self.workers * self.num_generations
        if episodes % self.num_minibatches:
            raise ValueError(
                f"each worker's {episodes} completions per step must be divisible by num_minibatches "
                f"({self.num_minibatches})"
            )
        if self.lora is not None and self.lora.dropout:
            raise ValueError("lora.dropout must be 0 in GRPO: sampling and update must be one function")
        return self

    @property
    def epsilon_above(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class Inputs(StrictModel):
    policy: str = Field(description="the starting policy (and the reference, unless set, when beta > 0)")
    reference: str | None = None
    prompts: str = Field(
        description="JSONL of {prompt, …}: the other fields reach reward functions as columns"
    )
    reward_model: str | None = Field(
        default=None,
        description="a reward model trained upstream (grpo-feedback): one more reward, trained_reward_model",
    )


class Outputs(TrainedPolicy):
    steps: int
    final_reward: float
    final_kl: float
