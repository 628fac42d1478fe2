"""Distributed training: which engine runs a trainer, with how many workers, and how their updates combine.

Pydantic only, so that configs load without importing torch. Trainers whose config inherits `Distributed`
accept `launcher:`, `workers:`, `sync:` … directly in their section of a pipeline config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_components.core.config import ModelStep, StrictModel


class KubernetesJobConfig(StrictModel):
    """Where and how a trainer's pods run on Kubernetes, and how the step waits for them."""

    namespace: str = "kubeflow"
    image: str | None = Field(default=None, description="the component image; default: $RLHF_IMAGE")
    service_account: str | None = None
    cpu: str | None = Field(default=None, description="per-pod CPU request and limit, e.g. '4'")
    memory: str | None = Field(default=None, description="per-pod memory request and limit, e.g. '16Gi'")
    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod")
    pending_timeout_seconds: int = Field(
        default=600, ge=1, description="fail when pods are still not running after this long"
    )
    run_timeout_seconds: int = Field(default=24 * 3600, ge=1, description="activeDeadlineSeconds of the job")
    cleanup: Literal["always", "on_success", "never"] = Field(
        default="on_success", description="when to delete the job after it ends"
    )
    poll_seconds: float = Field(default=5.0, gt=0.0)


class PyTorchJobConfig(KubernetesJobConfig):
    """A Kubeflow Training Operator (v1, legacy) PyTorchJob: one master and `workers − 1` worker pods."""

    env_from_secrets: list[str] = Field(
        default_factory=lambda: ["rlhf-s3-credentials", "rlhf-mlflow-credentials"],
        description="secrets exposed to the pods as environment variables (optional secrets)",
    )


class Toleration(StrictModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class TrainJobConfig(KubernetesJobConfig):
    """A Kubeflow Trainer v2 TrainJob on a (Cluster)TrainingRuntime: `workers / processes_per_node` nodes."""

    runtime: str = Field(default="torch-distributed", description="the runtime the TrainJob refers to")
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    processes_per_node: int = Field(default=1, ge=1, description="torchrun processes per node (its GPUs)")
    secret_env: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "rlhf-s3-credentials": [
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL",
                "AWS_DEFAULT_REGION",
            ],
            "rlhf-mlflow-credentials": [
                "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN",
            ],
        },
        description="secret → keys: each key becomes an environment variable of the nodes (optional)",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="through runtimePatches")
    tolerations: list[Toleration] = Field(default_factory=list, description="through runtimePatches")


class Distributed(ModelStep):
    """The fields every distributed trainer's config carries."""

    launcher: Literal["local", "torchrun", "trainjob", "pytorchjob"] = Field(
        default="local",
        description="local: this process; torchrun: N processes here; trainjob: a Kubeflow Trainer v2 "
        "TrainJob; pytorchjob: a Training Operator v1 PyTorchJob (legacy)",
    )
    workers: int = Field(default=1, ge=1, description="processes (torchrun, trainjob) or pods (pytorchjob)")
    sync: Literal["allreduce", "average_every_k"] = Field(
        default="allreduce",
        description="allreduce: average gradients; average_every_k: k local steps, then θ = mean θᵢ",
    )
    average_every: int = Field(default=4, ge=1, description="k of average_every_k, in optimizer steps")
    collective_timeout_seconds: int = Field(
        default=600, ge=1, description="a collective that waits longer than this fails the job"
    )
    trainjob: TrainJobConfig = Field(default_factory=TrainJobConfig)
    pytorchjob: PyTorchJobConfig = Field(default_factory=PyTorchJobConfig)

    @model_validator(mode="after")
    def _whole_nodes(self) -> Distributed:
        per_node = self.trainjob.processes_per_node
        if self.launcher == "trainjob" and self.workers % per_node:
            raise ValueError(
                f"workers: {self.workers} workers do not fill nodes of trainjob.processes_per_node {per_node}"
            )
        return self
