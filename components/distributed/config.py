"""Distributed training: which engine runs a trainer, with how many workers, and how their updates combine.

Pydantic only, so that configs load without importing torch. Trainers whose config inherits `Distributed`
accept `launcher:`, `workers:`, `sync:` … directly in their section of a pipeline config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_components.core.config import ModelStep, StrictModel


class PyTorchJobConfig(StrictModel):
    """A Kubeflow Training Operator PyTorchJob: one master and `workers − 1` worker pods."""

    namespace: str = "kubeflow"
    image: str | None = Field(default=None, description="the component image; default: $RLHF_IMAGE")
    service_account: str | None = None
    cpu: str | None = Field(default=None, description="per-pod CPU request and limit, e.g. '4'")
    memory: str | None = Field(default=None, description="per-pod memory request and limit, e.g. '16Gi'")
    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod")
    env_from_secrets: list[str] = Field(
        default_factory=lambda: ["rlhf-s3-credentials", "rlhf-mlflow-credentials"],
        description="secrets exposed to the pods as environment variables (optional secrets)",
    )
    pending_timeout_seconds: int = Field(
        default=600, ge=1, description="fail when pods are still not running after this long"
    )
    run_timeout_seconds: int = Field(default=24 * 3600, ge=1, description="activeDeadlineSeconds of the job")
    cleanup: Literal["always", "on_success", "never"] = Field(
        default="on_success", description="when to delete the PyTorchJob after it ends"
    )
    poll_seconds: float = Field(default=5.0, gt=0.0)


class Distributed(ModelStep):
    """The fields every distributed trainer's config carries."""

    launcher: Literal["local", "torchrun", "pytorchjob"] = Field(
        default="local", description="local: this process; torchrun: N processes here; pytorchjob: Kubernetes"
    )
    workers: int = Field(default=1, ge=1, description="processes (torchrun) or pods (pytorchjob)")
    sync: Literal["allreduce", "average_every_k"] = Field(
        default="allreduce",
        description="allreduce: average gradients; average_every_k: k local steps, then θ = mean θᵢ",
    )
    average_every: int = Field(default=4, ge=1, description="k of average_every_k, in optimizer steps")
    collective_timeout_seconds: int = Field(
        default=600, ge=1, description="a collective that waits longer than this fails the job"
    )
    pytorchjob: PyTorchJobConfig = Field(default_factory=PyTorchJobConfig)
