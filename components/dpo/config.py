"""dpo: configuration, inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_components.core.config import StrictModel
from rlhf_components.core.trainer_config import PairTrainerConfig, TrainedPolicy


class Config(PairTrainerConfig):
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        default="sigmoid",
        description="sigmoid: DPO (with label_smoothing: conservative DPO); ipo: IPO; hinge: SLiC; "
        "robust: robust DPO for noisy labels",
    )
    beta: float = Field(default=0.1, gt=0.0, description="strength of the implicit KL to the reference")
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=0.5, description="assumed fraction of flipped labels (sigmoid, robust)"
    )
    sft_coef: float = Field(default=0.0, ge=0.0, description="weight of an NLL term on the chosen responses")
    learning_rate: float = Field(default=5e-7, gt=0.0)


class Inputs(StrictModel):
    policy: str = Field(description="the SFT policy: the starting point, and the reference unless set")
    reference: str | None = None
    train: str = Field(description="preference pairs, JSONL of {prompt, chosen, rejected}")
    eval: str = Field(description="held-out preference pairs")


class Outputs(TrainedPolicy):
    steps: int
    eval_reward_accuracy: float
    eval_reward_margin: float
    eval_loss: float
