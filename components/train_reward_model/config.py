"""train_reward_model: configuration, inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_components.core.config import StrictModel
from rlhf_components.core.trainer_config import PairTrainerConfig


class Config(PairTrainerConfig):
    base: str | None = Field(
        default=None,
        description="the checkpoint whose backbone the reward model starts from (any family and tokenizer); "
        "default: the policy",
    )
    learning_rate: float = Field(default=5e-5, gt=0.0)
    margin: float = Field(default=0.0, ge=0.0, description="required score gap in the Bradley–Terry loss")
    center_rewards_coef: float = Field(default=0.0, ge=0.0, description="penalty on (r_chosen + r_rejected)²")


class Inputs(StrictModel):
    base_model: str | None = Field(
        default=None, description="the backbone to start from when the config names no `base` (the policy)"
    )
    pretrained: str | None = Field(
        default=None,
        description="a trained reward model to use as it is: it is only scored on the pairs, never trained",
    )
    train: str = Field(description="preference pairs, JSONL of {prompt, chosen, rejected}")
    eval: str = Field(description="held-out preference pairs")


class Outputs(StrictModel):
    reward_model: str = Field(description="the reward model; under LoRA with its adapter merged in")
    adapter: str | None = Field(
        default=None, description="under LoRA: the adapter and the trained head alone"
    )
    eval_accuracy: float
    train_accuracy: float
    num_train_pairs: int
    trained: bool = Field(default=True, description="false when a pretrained reward model was used as it is")
