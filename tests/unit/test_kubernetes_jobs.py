"""The Kubernetes launchers, `trainjob` (Kubeflow Trainer v2 TrainJob) and `pytorchjob` (Training Operator v1,
legacy): the manifests we build and the Kubernetes API calls we make, against the RECORDING fake API server
of fake_kubernetes.py. NOT a test of a real cluster, of Kubeflow Trainer or of the Training Operator."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.distributed import pytorchjob, trainjob
from rlhf_components.distributed.config import Distributed
from rlhf_components.distributed.kubernetes_job import JobKind, run_job

from .fake_kubernetes import PODS, FakeKubernetes, serving

JOB = {"context": {}, "inputs": {}, "config": {}}
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs"
PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/team/pytorchjobs"


def distributed(launcher: str, workers: int = 3, **settings: Any) -> Distributed:
    section = {"namespace": "team", "image": "registry.example/rlhf:1", "poll_seconds": 0.05, **settings}
    return Distributed.model_validate({"launcher": launcher, "workers": workers, launcher: section})


def trainjob_pods(name: str) -> list[tuple[str, dict[str, str]]]:
    """Node pods of the TrainJob's JobSet, node 1 listed first: rank 0 is found by its labels."""
    return [
        (
            f"{name}-node-0-{index}-x",
            {
                "jobset.sigs.k8s.io/jobset-name": name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": str(index),
            },
        )
        for index in (1, 0, 2)
    ]


FAKES = {
    "trainjob": lambda: FakeKubernetes(
        jobs=TRAINJOBS,
        succeeded="Complete",
        command_of=lambda m: m["spec"]["trainer"]["command"] + m["spec"]["trainer"]["args"],
        env_of=lambda m: m["spec"]["trainer"]["env"],
        pods_of=trainjob_pods,
    ),
    "pytorchjob": lambda: FakeKubernetes(
        jobs=PYTORCHJOBS,
        succeeded="Succeeded",
        command_of=lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "command"
        ],
        env_of=lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
            "env"
        ],
        pods_of=lambda name: [(f"{name}-worker-0", {}), (f"{name}-master-0", {})],
    ),
}
KINDS: dict[str, JobKind] = {"trainjob": trainjob.KIND, "pytorchjob": pytorchjob.KIND}
RANK_ZERO = {"trainjob": "-node-0-0-x", "pytorchjob": "-master-0"}
POD_LABEL = {"trainjob": "jobset.sigs.k8s.io/jobset-name", "pytorchjob": "training.kubeflow.org/job-name"}


@pytest.fixture(params=["trainjob", "pytorchjob"])
def kubernetes(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeKubernetes]:
    with serving(FAKES[request.param](), tmp_path, monkeypatch) as fake:
        yield fake


def launcher_of(fake: FakeKubernetes) -> str:
    return "trainjob" if fake.jobs == TRAINJOBS else "pytorchjob"


def test_the_trainjob_names_its_runtime_and_runs_torchrun_around_the_step_on_every_node() -> None:
    config = distributed(
        "trainjob",
        workers=4,
        processes_per_node=2,
        cpu="2",
        memory="8Gi",
        gpus=2,
        service_account="trainer",
        node_selector={"pool": "train"},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    manifest = trainjob.build_manifest("rlhf-ppo-1", "ppo", config, ["--config", "job.yaml"], {"A": "1"})
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"]["name"] == "rlhf-ppo-1" and manifest["metadata"]["namespace"] == "team"
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert spec["activeDeadlineSeconds"] == 86400
    trainer = spec["trainer"]
    # torchrun reads nodes, processes per node, node rank and master from the runtime's PET_* variables.
    assert trainer["command"] == ["python", "-m", "torch.distributed.run", "--max-restarts=0"]
    assert trainer["args"] == ["--module", "rlhf_components.ppo", "--config", "job.yaml"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)  # 4 workers in all
    assert trainer["image"] == "registry.example/rlhf:1"
    per_node = {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["A"] == {"name": "A", "value": "1"} and env["PYTHONUNBUFFERED"]["value"] == "1"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "rlhf-s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
        "optional": True,
    }
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rlhf-mlflow-credentials"
    [patch] = spec["runtimePatches"]
    assert patch["manager"] == "rlhf-pipelines"
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["spec"]["template"]["spec"] == {
        "serviceAccountName": "trainer",
        "nodeSelector": {"pool": "train"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    plain = trainjob.build_manifest("j", "dpo", distributed("trainjob", workers=1), [], {})
    assert "runtimePatches" not in plain["spec"] and "resourcesPerNode" not in plain["spec"]["trainer"]


def test_trainjob_workers_fill_whole_nodes() -> None:
    expected = r"3 workers do not fill nodes of trainjob\.processes_per_node 2"
    with pytest.raises(ValidationError, match=expected):
        distributed("trainjob", workers=3, processes_per_node=2)


def test_the_pytorchjob_has_what_the_training_operator_requires() -> None:
    config = distributed("pytorchjob", cpu="2", memory="8Gi", gpus=1, service_account="trainer")
    manifest = pytorchjob.build_manifest("rlhf-ppo-1", "ppo", config, ["--config", "job.yaml"], {"A": "1"})
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    assert manifest["metadata"]["name"] == "rlhf-ppo-1" and manifest["metadata"]["namespace"] == "team"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2  # 3 workers in all
    for spec in replicas.values():
        assert spec["restartPolicy"] == "Never"
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] == "trainer"
        [container] = pod["containers"]
        assert container["name"] == "pytorch"  # how the operator finds the training container
        assert container["image"] == "registry.example/rlhf:1"
        assert container["command"] == ["python", "-m", "rlhf_components.ppo", "--config", "job.yaml"]
        assert {"name": "A", "value": "1"} in container["env"]
        assert container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
        assert {s["secretRef"]["name"] for s in container["envFrom"]} == {
            "rlhf-s3-credentials",
            "rlhf-mlflow-credentials",
        }
        assert all(s["secretRef"]["optional"] for s in container["envFrom"])
    assert manifest["spec"]["runPolicy"] == {
        "backoffLimit": 0,
        "activeDeadlineSeconds": 86400,
        "cleanPodPolicy": "None",
    }
    alone = pytorchjob.build_manifest("j", "ppo", distributed("pytorchjob", workers=1), [], {})
    assert set(alone["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_a_job_is_created_watched_logged_and_cleaned_up(
    kubernetes: FakeKubernetes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = launcher_of(kubernetes)
    with caplog.at_level(logging.INFO):
        outputs = run_job(KINDS[launcher], "ppo", JOB, distributed(launcher), str(tmp_path / "jobs"))
    assert outputs == {"answer": 42}
    methods = [(method, path) for method, path, _ in kubernetes.calls]
    name = kubernetes.manifest["metadata"]["name"]
    assert methods[0] == ("POST", kubernetes.jobs) and methods[-1] == ("DELETE", f"{kubernetes.jobs}/{name}")
    log_calls = [(path, query) for _, path, query in kubernetes.calls if path.endswith("/log")]
    assert log_calls == [(f"{PODS}/{name}{RANK_ZERO[launcher]}/log", {"follow": ["True"]})]
    assert "step 2: loss 0.5" in caplog.text
    pod_queries = [query for _, path, query in kubernetes.calls if path == PODS]
    assert pod_queries[0] == {"labelSelector": [f"{POD_LABEL[launcher]}={name}"]}
    # The job file every pod reads is the launcher's job; the error dir is set on every worker.
    assert storage.read_json(kubernetes.argument("--config")) == JOB
    assert any(e["name"] == "RLHF_WORKER_ERROR_DIR" for e in kubernetes.env_of(kubernetes.manifest))


def test_a_failed_job_reports_the_failing_worker_and_is_kept_for_inspection(
    kubernetes: FakeKubernetes, tmp_path: Path
) -> None:
    kubernetes.end = "Failed"
    launcher = launcher_of(kubernetes)
    with pytest.raises(UserError, match=r"ppo: worker 1 of 3 failed: RuntimeError: out of memory"):
        run_job(KINDS[launcher], "ppo", JOB, distributed(launcher), str(tmp_path / "jobs"))
    assert not any(method == "DELETE" for method, _, _ in kubernetes.calls)  # cleanup: on_success


def test_an_image_that_cannot_be_pulled_fails_at_once(kubernetes: FakeKubernetes, tmp_path: Path) -> None:
    kubernetes.pod_phase, kubernetes.waiting_reason = "Pending", "ImagePullBackOff"
    launcher = launcher_of(kubernetes)
    started = time.monotonic()
    with pytest.raises(
        UserError, match=rf"{launcher}: pod .* cannot start: ImagePullBackOff: image not found"
    ):
        run_job(KINDS[launcher], "ppo", JOB, distributed(launcher, cleanup="always"), str(tmp_path / "jobs"))
    assert time.monotonic() - started < 10
    assert kubernetes.calls[-1][0] == "DELETE"


def test_pods_that_never_run_fail_after_the_pending_timeout(
    kubernetes: FakeKubernetes, tmp_path: Path
) -> None:
    kubernetes.pod_phase = "Pending"
    launcher = launcher_of(kubernetes)
    started = time.monotonic()
    with pytest.raises(
        UserError, match=rf"still has pods not running after 1 s \({launcher}.pending_timeout"
    ):
        run_job(KINDS[launcher], "ppo", JOB, distributed(launcher, pending_timeout_seconds=1), str(tmp_path))
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("launcher", ["trainjob", "pytorchjob"])
def test_no_kubeconfig_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(
        UserError, match=rf"{launcher}: no Kubernetes credentials: not in a cluster and no usab"
    ):
        run_job(KINDS[launcher], "ppo", JOB, distributed(launcher), str(tmp_path / "jobs"))
