"""The fields every trainer's config shares: optimizer, learning-rate schedule, checkpoints, workers.

Pydantic only, so that configs load without importing torch. The trainer kernel (core/trainer.py) reads
them; each trainer's Config inherits `TrainerConfig` (PPO) or `PairTrainerConfig` (reward model, DPO) and
sets its own defaults, so a pipeline config still names them flat in the trainer's section.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from rlhf_components.core.config import ModelStep, StrictModel
from rlhf_components.distributed.config import Distributed


class Lora(StrictModel):
    """Low-rank adapters in place of full fine-tuning (core/lora.py)."""

    rank: int = Field(default=16, ge=1, description="r: the adapters' rank")
    alpha: float = Field(default=32.0, gt=0.0, description="the adapters' output is scaled by alpha / rank")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: Literal["auto"] | list[str] = Field(
        default="auto",
        description="auto: every linear layer of the attention and MLP blocks, whatever the architecture "
        "calls them (not the output head); or the layer names, e.g. [q_proj, v_proj]",
    )
    adapter: str | None = Field(
        default=None,
        description="continue training a saved adapter instead of new ones: a directory (local or s3://) or "
        "models:/name@alias of a model registered with one",
    )


class TrainedPolicy(StrictModel):
    """The outputs every policy trainer has (PPO, DPO, GRPO)."""

    policy: str = Field(description="the trained policy; under LoRA with its adapter merged in")
    policy_adapter: str | None = Field(default=None, description="under LoRA: the adapter alone")


class TrainerConfig(Distributed):
    learning_rate: float = Field(default=1e-5, gt=0.0)
    lr_schedule: Literal["linear", "constant"] = Field(
        default="linear", description="linear: annealed to 0 over the run; constant: never changed"
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW's decoupled weight decay")
    adam_eps: float = Field(default=1e-8, gt=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, description="gradients are clipped to this norm")
    checkpoint_every: int = Field(
        default=0,
        ge=0,
        description="checkpoint every N steps of the trainer's loop (PPO: iterations; reward model and DPO: "
        "optimizer steps); 0 = only when stopped by SIGTERM",
    )
    resume: bool = Field(default=True, description="continue from this run's checkpoint when there is one")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in the backward pass: less memory, more time"
    )
    lora: Lora | None = Field(
        default=None, description="train LoRA adapters on frozen base weights; unset: full fine-tuning"
    )

    def checkpoint_fingerprint(self) -> dict[str, object]:
        """The config a checkpoint must match to be resumed: how many workers ran it, on which device, how
        often it checkpointed and whether activations were recomputed do not matter."""
        distribution = set(Distributed.model_fields) - set(ModelStep.model_fields)
        unrelated = {*distribution, "device", "checkpoint_every", "resume", "gradient_checkpointing"}
        return self.model_dump(mode="json", exclude=unrelated)


class PairTrainerConfig(TrainerConfig):
    """Trainers that walk global batches of preference pairs, each worker scoring its own part of each."""

    batch_size: int = Field(default=16, ge=1, description="pairs per optimizer step, over all workers")
    epochs: int = Field(default=1, ge=1)
    max_length: int = Field(default=256, ge=8, description="prompt + response tokens; prompts are cut first")

    @model_validator(mode="after")
    def _every_worker_has_pairs(self) -> PairTrainerConfig:
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least workers ({self.workers})")
        return self

    def total_steps(self, pairs: int) -> int:
        """Optimizer steps over `pairs` training pairs: the last batch of an epoch may be short."""
        return math.ceil(pairs / self.batch_size) * self.epochs
