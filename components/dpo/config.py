"""dpo: configuration, inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_components.core.config import StrictModel
from rlhf_components.distributed.config import GlobalBatches


class Config(GlobalBatches):
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
    epochs: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=5e-7, gt=0.0)
    lr_schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    max_length: int = Field(default=256, ge=8, description="prompt + response tokens; prompts are cut first")
    checkpoint_every: int = Field(
        default=0, ge=0, description="optimizer steps between checkpoints; 0 = only when stopped by SIGTERM"
    )
    resume: bool = Field(default=True, description="continue from this run's checkpoint when there is one")
    trust_remote_code: bool = False


class Inputs(StrictModel):
    policy: str = Field(description="the SFT policy: the starting point, and the reference unless set")
    reference: str | None = None
    train: str = Field(description="preference pairs, JSONL of {prompt, chosen, rejected}")
    eval: str = Field(description="held-out preference pairs")


class Outputs(StrictModel):
    policy: str
    steps: int
    eval_reward_accuracy: float
    eval_reward_margin: float
    eval_loss: float
