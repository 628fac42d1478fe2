"""train_reward_model: configuration, inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_components.core.config import StrictModel
from rlhf_components.distributed.config import GlobalBatches


class Config(GlobalBatches):
    epochs: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_length: int = Field(default=256, ge=8)
    margin: float = Field(default=0.0, ge=0.0, description="required score gap in the Bradley–Terry loss")
    center_rewards_coef: float = Field(default=0.0, ge=0.0, description="penalty on (r_chosen + r_rejected)²")
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    trust_remote_code: bool = False


class Inputs(StrictModel):
    base_model: str = Field(description="the policy checkpoint whose backbone the reward model starts from")
    train: str
    eval: str


class Outputs(StrictModel):
    reward_model: str
    eval_accuracy: float
    train_accuracy: float
    num_train_pairs: int
