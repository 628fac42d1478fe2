"""The `pytorchjob` launcher (legacy): a Kubeflow Training Operator v1 PyTorchJob, built from the
kubeflow-training SDK's models. The Training Operator starts one Master and `workers − 1` Worker pods and sets
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each. Training Operator v1 is in maintenance: prefer
`trainjob`. Creating, waiting and cleaning up: kubernetes_job.py.
"""

from __future__ import annotations

from typing import Any

from rlhf_components.distributed.config import Distributed
from rlhf_components.distributed.kubernetes_job import JobKind, job_image, job_labels, pod_resources

GROUP, VERSION = "kubeflow.org", "v1"


def build_manifest(
    name: str, step: str, config: Distributed, arguments: list[str], env: dict[str, str]
) -> dict[str, Any]:
    """The PyTorchJob as the API server wants it (camelCase JSON), from the SDK's typed models."""
    from kubeflow.training import models
    from kubernetes import client

    settings = config.pytorchjob
    resources = pod_resources(settings)
    container = client.V1Container(
        name="pytorch",  # the Training Operator finds the training container by this name
        image=job_image("pytorchjob", settings),
        command=["python", "-m", f"rlhf_components.{step}", *arguments],
        env=[
            client.V1EnvVar(name=key, value=value) for key, value in {"PYTHONUNBUFFERED": "1", **env}.items()
        ],
        env_from=[
            client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=secret, optional=True))
            for secret in settings.env_from_secrets
        ],
        resources=client.V1ResourceRequirements(requests=resources, limits=resources) if resources else None,
    )
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels={"rlhf.step": step}),
        spec=client.V1PodSpec(containers=[container], service_account_name=settings.service_account),
    )
    replicas = {
        "Master": models.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never", template=template)
    }
    if config.workers > 1:
        replicas["Worker"] = models.KubeflowOrgV1ReplicaSpec(
            replicas=config.workers - 1, restart_policy="Never", template=template
        )
    job = models.KubeflowOrgV1PyTorchJob(
        api_version=f"{GROUP}/{VERSION}",
        kind="PyTorchJob",
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=settings.namespace,
            labels=job_labels(step),
        ),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=replicas,
            run_policy=models.KubeflowOrgV1RunPolicy(
                backoff_limit=0,
                active_deadline_seconds=settings.run_timeout_seconds,
                clean_pod_policy="None",
            ),
        ),
    )
    manifest: dict[str, Any] = client.ApiClient().sanitize_for_serialization(job)
    return manifest


KIND = JobKind(
    launcher="pytorchjob",
    group=GROUP,
    version=VERSION,
    plural="pytorchjobs",
    succeeded="Succeeded",
    pod_label="training.kubeflow.org/job-name",
    build=build_manifest,
    rank_zero=lambda pods: next((p for p in pods if p.metadata.name.endswith("master-0")), pods[0]),
)
