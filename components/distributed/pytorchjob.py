"""The `pytorchjob` launcher: a Kubeflow Training Operator PyTorchJob, built from the kubeflow-training SDK's
models, created and watched with the Kubernetes client, its master's log streamed here, cleaned up by policy.

The Training Operator starts one Master and `workers − 1` Worker pods and sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in each; every pod runs the step's standalone command line. The job file, rank
0's outputs and the workers' errors travel through `storage` (s3://), which every pod can reach.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.step import WORKER_ERROR_DIR_ENV
from rlhf_components.distributed.config import Distributed, PyTorchJobConfig
from rlhf_components.distributed.launcher import worker_failure

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
# Waiting reasons that mean a pod will never start without someone changing something.
STUCK_REASONS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


def build_manifest(name: str, step: str, config: Distributed, command: list[str]) -> dict[str, Any]:
    """The PyTorchJob as the API server wants it (camelCase JSON), from the SDK's typed models."""
    from kubeflow.training import models
    from kubernetes import client

    settings = config.pytorchjob
    image = settings.image or os.environ.get("RLHF_IMAGE")
    if not image:
        raise UserError("pytorchjob.image: no image for the workers (set it, or RLHF_IMAGE)")
    resources = {
        key: value
        for key, value in {"cpu": settings.cpu, "memory": settings.memory}.items()
        if value is not None
    }
    if settings.gpus:
        resources["nvidia.com/gpu"] = str(settings.gpus)
    container = client.V1Container(
        name="pytorch",  # the Training Operator finds the training container by this name
        image=image,
        command=command,
        env=[client.V1EnvVar(name="PYTHONUNBUFFERED", value="1")],
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
            labels={"app.kubernetes.io/managed-by": "rlhf-pipelines", "rlhf.step": step},
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


def kubernetes_clients() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) from the pod's service account, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        path = os.environ.get("KUBECONFIG", "~/.kube/config")
        try:
            config.load_kube_config(config_file=path)  # read now: the client reads KUBECONFIG at import
        except (config.ConfigException, OSError) as error:
            raise UserError(
                f"pytorchjob: no Kubernetes credentials: not in a cluster and no usable kubeconfig at {path} "
                f"({error})"
            ) from None
    return client.CustomObjectsApi(), client.CoreV1Api()


def run_pytorchjob(step: str, job: dict[str, Any], config: Distributed, folder: str) -> Any:
    """Create the PyTorchJob, wait for it with status and logs, clean up; returns rank 0's outputs."""
    from kubernetes.client.exceptions import ApiException

    settings = config.pytorchjob
    name = f"rlhf-{step.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    job_file, outputs_file, errors = (
        storage.join(folder, name, part) for part in ("job.yaml", "outputs.json", "errors")
    )
    storage.write_json(job_file, job)
    command = ["python", "-m", f"rlhf_components.{step}", "--config", job_file, "--outputs", outputs_file]
    manifest = build_manifest(name, step, config, command)
    for container in _containers(manifest):
        container.setdefault("env", []).append({"name": WORKER_ERROR_DIR_ENV, "value": errors})
    custom, core = kubernetes_clients()
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, settings.namespace, PLURAL, manifest)
    except ApiException as error:
        raise UserError(f"pytorchjob: the API server refused {name}: {error.status} {error.reason}") from None
    log.info("%s: created PyTorchJob %s/%s with %d workers", step, settings.namespace, name, config.workers)
    succeeded = False
    try:
        succeeded = _wait(custom, core, name, settings)
    finally:
        if settings.cleanup == "always" or (settings.cleanup == "on_success" and succeeded):
            custom.delete_namespaced_custom_object(GROUP, VERSION, settings.namespace, PLURAL, name)
            log.info("%s: deleted PyTorchJob %s", step, name)
    if not succeeded:
        raise UserError(worker_failure(step, config.workers, errors, returncode=1))
    return storage.read_json(outputs_file)


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    specs = manifest["spec"]["pytorchReplicaSpecs"].values()
    return [container for spec in specs for container in spec["template"]["spec"]["containers"]]


def _wait(custom: Any, core: Any, name: str, settings: PyTorchJobConfig) -> bool:
    """Until the job succeeds (True) or fails (False); pods stuck before running fail it within
    `pending_timeout_seconds`, and the master's log is streamed here once it runs."""
    started = time.monotonic()
    streamed = False
    while True:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, settings.namespace, PLURAL, name).get(
            "status", {}
        )
        conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
        if "Succeeded" in conditions:
            return True
        if "Failed" in conditions:
            log.error("PyTorchJob %s failed: %s", name, conditions["Failed"].get("message", ""))
            return False
        pods = core.list_namespaced_pod(settings.namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
        for pod in pods:
            for container in pod.status.container_statuses or []:
                waiting = container.state.waiting if container.state else None
                if waiting is not None and waiting.reason in STUCK_REASONS:
                    raise UserError(
                        f"pytorchjob: pod {pod.metadata.name} cannot start: "
                        f"{waiting.reason}: {waiting.message}"
                    )
        running = [pod for pod in pods if pod.status.phase in {"Running", "Succeeded", "Failed"}]
        if len(running) < len(pods) or not pods:
            if time.monotonic() - started > settings.pending_timeout_seconds:
                raise UserError(
                    f"pytorchjob: {name} still has pods not running after "
                    f"{settings.pending_timeout_seconds} s "
                    "(pytorchjob.pending_timeout_seconds); check the image, resources and quota"
                )
        elif not streamed:
            master = next((p for p in pods if p.metadata.name.endswith("master-0")), pods[0])
            _stream_log(core, master.metadata.name, settings.namespace)
            streamed = True
        time.sleep(settings.poll_seconds)


def _stream_log(core: Any, pod: str, namespace: str) -> None:
    """Follow a pod's log until it ends, line by line into ours."""
    response = core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False)
    try:
        for line in response.stream():
            for text in line.decode("utf-8", "replace").splitlines():
                log.info("[%s] %s", pod, text)
    finally:
        response.release_conn()
