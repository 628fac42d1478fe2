"""What the Kubernetes launchers (`trainjob`, `pytorchjob`) share: create the job from its manifest, wait for
it with its status and its pods' states, stream rank 0's log here, fail fast on pods that cannot start, clean
up by policy, and return rank 0's outputs.

Every pod runs the step's standalone command line. The job file, rank 0's outputs and the workers' errors
travel through `storage` (s3://), which every pod can reach.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.step import WORKER_ERROR_DIR_ENV
from rlhf_components.distributed.config import Distributed, KubernetesJobConfig
from rlhf_components.distributed.launcher import worker_failure

log = logging.getLogger(__name__)

# Waiting reasons that mean a pod will never start without someone changing something.
STUCK_REASONS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


@dataclass(frozen=True)
class JobKind:
    """One kind of training job: its custom resource, how its manifest is built, how its pods are found."""

    launcher: str  # the config's `launcher` value, which names the settings section too
    group: str
    version: str
    plural: str
    succeeded: str  # the status condition of a job that succeeded
    pod_label: str  # label selector key whose value is the job's name
    build: Callable[[str, str, Distributed, list[str], dict[str, str]], dict[str, Any]]
    """(name, step, config, command, extra env) → the manifest"""
    rank_zero: Callable[[list[Any]], Any]
    """the pod whose log is streamed, among the job's pods"""


def kubernetes_clients(launcher: str) -> tuple[Any, Any]:
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
                f"{launcher}: no Kubernetes credentials: not in a cluster and no usable kubeconfig at {path} "
                f"({error})"
            ) from None
    return client.CustomObjectsApi(), client.CoreV1Api()


def job_image(launcher: str, settings: KubernetesJobConfig) -> str:
    image = settings.image or os.environ.get("RLHF_IMAGE")
    if not image:
        raise UserError(f"{launcher}.image: no image for the workers (set it, or RLHF_IMAGE)")
    return image


def job_labels(step: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "rlhf-pipelines", "rlhf.step": step}


def pod_resources(settings: KubernetesJobConfig) -> dict[str, str]:
    """Requests = limits: CPU, memory and GPUs per pod, as set."""
    resources = {
        key: value
        for key, value in {"cpu": settings.cpu, "memory": settings.memory}.items()
        if value is not None
    }
    if settings.gpus:
        resources["nvidia.com/gpu"] = str(settings.gpus)
    return resources


def run_job(kind: JobKind, step: str, job: dict[str, Any], config: Distributed, folder: str) -> Any:
    """Create the job, wait for it with status and logs, clean up; returns rank 0's outputs."""
    from kubernetes.client.exceptions import ApiException

    settings: KubernetesJobConfig = getattr(config, kind.launcher)
    name = f"rlhf-{step.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    job_file, outputs_file, errors = (
        storage.join(folder, name, part) for part in ("job.yaml", "outputs.json", "errors")
    )
    storage.write_json(job_file, job)
    arguments = ["--config", job_file, "--outputs", outputs_file]
    manifest = kind.build(name, step, config, arguments, {WORKER_ERROR_DIR_ENV: errors})
    custom, core = kubernetes_clients(kind.launcher)
    api = (kind.group, kind.version, settings.namespace, kind.plural)
    try:
        custom.create_namespaced_custom_object(*api, manifest)
    except ApiException as error:
        raise UserError(
            f"{kind.launcher}: the API server refused {name}: {error.status} {error.reason}"
        ) from None
    log.info(
        "%s: created %s %s/%s with %d workers",
        step,
        manifest["kind"],
        settings.namespace,
        name,
        config.workers,
    )
    succeeded = False
    try:
        succeeded = _wait(kind, custom, core, name, settings)
    finally:
        if settings.cleanup == "always" or (settings.cleanup == "on_success" and succeeded):
            custom.delete_namespaced_custom_object(*api, name)
            log.info("%s: deleted %s %s", step, manifest["kind"], name)
    if not succeeded:
        raise UserError(worker_failure(step, config.workers, errors, returncode=1))
    return storage.read_json(outputs_file)


def _wait(kind: JobKind, custom: Any, core: Any, name: str, settings: KubernetesJobConfig) -> bool:
    """Until the job succeeds (True) or fails (False); pods stuck before running fail it within
    `pending_timeout_seconds`, and rank 0's log is streamed here once it runs."""
    started = time.monotonic()
    streamed = False
    while True:
        found = custom.get_namespaced_custom_object(
            kind.group, kind.version, settings.namespace, kind.plural, name
        )
        conditions = {
            c["type"]: c for c in found.get("status", {}).get("conditions", []) if c.get("status") == "True"
        }
        if kind.succeeded in conditions:
            return True
        if "Failed" in conditions:
            log.error("%s %s failed: %s", found.get("kind"), name, conditions["Failed"].get("message", ""))
            return False
        pods = core.list_namespaced_pod(settings.namespace, label_selector=f"{kind.pod_label}={name}").items
        for pod in pods:
            for container in pod.status.container_statuses or []:
                waiting = container.state.waiting if container.state else None
                if waiting is not None and waiting.reason in STUCK_REASONS:
                    raise UserError(
                        f"{kind.launcher}: pod {pod.metadata.name} cannot start: "
                        f"{waiting.reason}: {waiting.message}"
                    )
        running = [pod for pod in pods if pod.status.phase in {"Running", "Succeeded", "Failed"}]
        if len(running) < len(pods) or not pods:
            if time.monotonic() - started > settings.pending_timeout_seconds:
                raise UserError(
                    f"{kind.launcher}: {name} still has pods not running after "
                    f"{settings.pending_timeout_seconds} s "
                    f"({kind.launcher}.pending_timeout_seconds); check the image, resources and quota"
                )
        elif not streamed:
            _stream_log(core, kind.rank_zero(pods).metadata.name, settings.namespace)
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
