"""The `trainjob` launcher: a Kubeflow Trainer v2 TrainJob (`trainer.kubeflow.org/v1alpha1`) on a named
(Cluster)TrainingRuntime, `torch-distributed` by default, built from the Trainer API's typed models
(kubeflow-trainer-api, the models of the `kubeflow` SDK).

The runtime's torch plugin starts `workers / processes_per_node` node pods and sets PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in each. Each node runs torchrun,
which reads them, around the step's standalone command line. Node selectors, tolerations and the service
account reach the node pods through `runtimePatches`. Creating, waiting and cleaning up: kubernetes_job.py.
"""

from __future__ import annotations

from typing import Any

from rlhf_components.distributed.config import Distributed
from rlhf_components.distributed.kubernetes_job import JobKind, job_image, job_labels, pod_resources

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
NODE_JOB = "node"  # the replicated job of the trainer's nodes in Trainer's runtimes
PATCH_MANAGER = "rlhf-pipelines"


def build_manifest(
    name: str, step: str, config: Distributed, arguments: list[str], env: dict[str, str]
) -> dict[str, Any]:
    """The TrainJob as the API server wants it (camelCase JSON), from the Trainer API's models."""
    from kubeflow_trainer_api import models as m

    settings = config.trainjob
    resources = {
        key: m.IoK8sApimachineryPkgApiResourceQuantity(value)
        for key, value in pod_resources(settings).items()
    }
    variables = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in {"PYTHONUNBUFFERED": "1", **env}.items()]
    variables += [
        m.IoK8sApiCoreV1EnvVar(
            name=key,
            valueFrom=m.IoK8sApiCoreV1EnvVarSource(
                secretKeyRef=m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=True)
            ),
        )
        for secret, keys in settings.secret_env.items()
        for key in keys
    ]
    trainer = m.TrainerV1alpha1Trainer(
        image=job_image("trainjob", settings),
        command=["python", "-m", "torch.distributed.run", "--max-restarts=0"],
        args=["--module", f"rlhf_components.{step}", *arguments],
        numNodes=config.workers // settings.processes_per_node,
        numProcPerNode=settings.processes_per_node,
        resourcesPerNode=m.IoK8sApiCoreV1ResourceRequirements(requests=resources, limits=resources)
        if resources
        else None,
        env=variables,
    )
    spec = m.TrainerV1alpha1TrainJobSpec(
        runtimeRef=m.TrainerV1alpha1RuntimeRef(
            name=settings.runtime, apiGroup=GROUP, kind=settings.runtime_kind
        ),
        trainer=trainer,
        activeDeadlineSeconds=settings.run_timeout_seconds,
        runtimePatches=_node_pod_patches(settings),
    )
    job = m.TrainerV1alpha1TrainJob(
        apiVersion=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name,
            namespace=settings.namespace,
            labels=job_labels(step),
        ),
        spec=spec,
    )
    manifest: dict[str, Any] = job.to_dict()
    return manifest


def _node_pod_patches(settings: Any) -> Any:
    """The node pods' service account, node selector and tolerations; None when none is set."""
    from kubeflow_trainer_api import models as m

    pod = {
        "serviceAccountName": settings.service_account,
        "nodeSelector": settings.node_selector or None,
        "tolerations": [
            m.IoK8sApiCoreV1Toleration(**toleration.model_dump(exclude_none=True))
            for toleration in settings.tolerations
        ]
        or None,
    }
    if all(value is None for value in pod.values()):
        return None
    node = m.TrainerV1alpha1ReplicatedJobPatch(
        name=NODE_JOB,
        template=m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(
                template=m.TrainerV1alpha1PodTemplatePatch(spec=m.TrainerV1alpha1PodSpecPatch(**pod))
            )
        ),
    )
    template = m.TrainerV1alpha1JobSetTemplatePatch(
        spec=m.TrainerV1alpha1JobSetSpecPatch(replicatedJobs=[node])
    )
    return [
        m.TrainerV1alpha1RuntimePatch(
            manager=PATCH_MANAGER,
            trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(template=template),
        )
    ]


def _rank_zero(pods: list[Any]) -> Any:
    """Node 0 of the trainer's replicated job (the JobSet's completion index 0)."""
    for pod in pods:
        labels = pod.metadata.labels or {}
        if labels.get("jobset.sigs.k8s.io/replicatedjob-name") == NODE_JOB and (
            labels.get("batch.kubernetes.io/job-completion-index") == "0"
        ):
            return pod
    return pods[0]


KIND = JobKind(
    launcher="trainjob",
    group=GROUP,
    version=VERSION,
    plural="trainjobs",
    succeeded="Complete",
    pod_label="jobset.sigs.k8s.io/jobset-name",  # the TrainJob's JobSet has its name
    build=build_manifest,
    rank_zero=_rank_zero,
)
