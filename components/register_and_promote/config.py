"""register_and_promote: configuration (with the evidence gate), inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_components.core.config import StrictModel


class GateConfig(StrictModel):
    metric: str = Field(default="rm_win_rate", description="evaluation win rate whose CI decides")
    min_ci_low: float = Field(default=0.5, ge=0.0, le=1.0, description="lower CI bound must exceed this")
    max_kl: float = Field(default=25.0, gt=0.0, description="KL to the reference must stay under this")
    must_beat_champion: bool = Field(
        default=True, description="also require <metric>_vs_champion_ci_low > 0.5"
    )


class Config(StrictModel):
    policy_name: str = Field(default="rlhf-policy", min_length=1)
    reward_model_name: str = Field(default="rlhf-reward-model", min_length=1)
    gate: GateConfig = Field(default_factory=GateConfig)
    trust_remote_code: bool = False


class Inputs(StrictModel):
    policy: str
    policy_adapter: str | None = Field(default=None, description="the policy's LoRA adapter, if it has one")
    reward_model: str | None = Field(default=None, description="none in the DPO pipeline")
    reward_model_adapter: str | None = Field(default=None, description="the reward model's LoRA adapter")
    evaluation: dict[str, float] = Field(description="evaluate's metrics")
    reward_model_accuracy: float | None = None
    lineage: dict[str, str] = Field(default_factory=dict, description="dataset hashes, config hash, …")
    parent_version: str | None = Field(
        default=None, description="the production version this run started from"
    )


class RegisteredVersion(StrictModel):
    name: str
    version: str
    aliases: list[str]


class Outputs(StrictModel):
    summary: str
    promoted: bool
    reasons: list[str]
    registered: dict[str, RegisteredVersion]
