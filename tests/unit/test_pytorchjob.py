"""The `pytorchjob` launcher: the manifest we build and the Kubernetes API calls we make. NOT a test of a real
cluster or of the Training Operator.

A tiny HTTP server, started inside the test on 127.0.0.1, plays the Kubernetes API server. It RECORDS every
request the kubernetes client makes for us and answers with the minimal JSON the client needs:

    POST   /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs            the job, echoed back
    GET    /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs/NAME       status: Running, then the scenario's end
    GET    /api/v1/namespaces/NS/pods?labelSelector=...               the scenario's pods
    GET    /api/v1/namespaces/NS/pods/POD/log?follow=true             a few log lines
    DELETE /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs/NAME       {}

Where the scenario ends in success the server writes rank 0's outputs where the job's command says, as the
master pod would; where it ends in failure it leaves a worker's error report. So these tests pin down what
we send and how we wait, log, clean up and fail, not whether a cluster would run it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.distributed.config import Distributed, PyTorchJobConfig
from rlhf_components.distributed.pytorchjob import build_manifest, run_pytorchjob

JOBS = "/apis/kubeflow.org/v1/namespaces/team/pytorchjobs"
PODS = "/api/v1/namespaces/team/pods"


@dataclass
class FakeKubernetes:
    """Scenario: `end` is Succeeded or Failed; `pods` is what the pod list shows while the job runs."""

    end: str = "Succeeded"
    pod_phase: str = "Running"
    waiting_reason: str | None = None
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    status_reads: int = 0

    def argument(self, flag: str) -> str:
        command = self.container("Master")["command"]
        return str(command[command.index(flag) + 1])

    def container(self, role: str) -> dict[str, Any]:
        spec = self.manifest["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
        return dict(spec["containers"][0])

    def status(self) -> dict[str, Any]:
        self.status_reads += 1
        if self.status_reads == 1 or self.pod_phase != "Running":
            return {"conditions": [{"type": "Created", "status": "True"}]}
        if self.end == "Succeeded":
            storage.write_json(self.argument("--outputs"), {"answer": 42})
        else:
            env = self.container("Worker")["env"]
            errors = next(e["value"] for e in env if e["name"] == "RLHF_WORKER_ERROR_DIR")
            report = {"time": 1.0, "reason": "RuntimeError: out of memory"}
            storage.write_json(f"{errors}/rank-1.json", report)
        return {"conditions": [{"type": "Running", "status": "False"}, {"type": self.end, "status": "True"}]}

    def pods(self) -> dict[str, Any]:
        name = self.manifest["metadata"]["name"]
        waiting = {"waiting": {"reason": self.waiting_reason, "message": "image not found"}}
        statuses = [
            {
                "name": "pytorch",
                "state": waiting if self.waiting_reason else {"running": {}},
                "ready": False,
                "restartCount": 0,
                "image": "x",
                "imageID": "",
            }
        ]
        return {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": [
                {
                    "metadata": {"name": f"{name}-{role}-0", "namespace": "team"},
                    "status": {"phase": self.pod_phase, "containerStatuses": statuses},
                }
                for role in ("master", "worker")
            ],
        }


@pytest.fixture
def kubernetes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.calls.append(("POST", self.path, body))
            fake.manifest = body
            self._reply(201, body)

        def do_DELETE(self) -> None:
            fake.calls.append(("DELETE", self.path, None))
            self._reply(200, {"kind": "Status", "status": "Success"})

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            fake.calls.append(("GET", path, urllib.parse.parse_qs(query)))
            name = fake.manifest.get("metadata", {}).get("name")
            if path == f"{JOBS}/{name}":
                self._reply(200, {**fake.manifest, "status": fake.status()})
            elif path == PODS:
                self._reply(200, fake.pods())
            elif path.startswith(PODS) and path.endswith("/log"):
                self._reply(200, b"step 1: loss 0.7\nstep 2: loss 0.5\n", "text/plain")
            else:
                self._reply(404, {"kind": "Status", "code": 404})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [
                    {"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    server.shutdown()


def distributed(**pytorchjob: Any) -> Distributed:
    settings = {"namespace": "team", "image": "registry.example/rlhf:1", "poll_seconds": 0.05, **pytorchjob}
    return Distributed(launcher="pytorchjob", workers=3, pytorchjob=PyTorchJobConfig(**settings))


JOB = {"context": {}, "inputs": {}, "config": {}}


def test_manifest_has_what_the_training_operator_requires() -> None:
    config = distributed(cpu="2", memory="8Gi", gpus=1, service_account="trainer")
    manifest = build_manifest("rlhf-ppo-1", "ppo", config, ["python", "-m", "rlhf_components.ppo"])
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
        assert container["command"] == ["python", "-m", "rlhf_components.ppo"]
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
    alone = build_manifest("j", "ppo", distributed().model_copy(update={"workers": 1}), ["x"])
    assert set(alone["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_a_job_is_created_watched_logged_and_cleaned_up(
    kubernetes: FakeKubernetes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        outputs = run_pytorchjob("ppo", JOB, distributed(), str(tmp_path / "jobs"))
    assert outputs == {"answer": 42}
    methods = [(method, path) for method, path, _ in kubernetes.calls]
    name = kubernetes.manifest["metadata"]["name"]
    assert methods[0] == ("POST", JOBS) and methods[-1] == ("DELETE", f"{JOBS}/{name}")
    log_calls = [query for method, path, query in kubernetes.calls if path.endswith("/log")]
    assert log_calls == [{"follow": ["True"]}] and f"{name}-master-0" in caplog.text
    assert "step 2: loss 0.5" in caplog.text
    pod_queries = [query for _, path, query in kubernetes.calls if path == PODS]
    assert pod_queries[0] == {"labelSelector": [f"training.kubeflow.org/job-name={name}"]}
    # The job file every pod reads is the launcher's job; the error dir is set on every container.
    container = kubernetes.container("Worker")
    assert storage.read_json(kubernetes.argument("--config")) == JOB
    assert any(e["name"] == "RLHF_WORKER_ERROR_DIR" for e in container["env"])


def test_a_failed_job_reports_the_failing_worker_and_is_kept_for_inspection(
    kubernetes: FakeKubernetes, tmp_path: Path
) -> None:
    kubernetes.end = "Failed"
    with pytest.raises(UserError, match=r"ppo: worker 1 of 3 failed: RuntimeError: out of memory"):
        run_pytorchjob("ppo", JOB, distributed(), str(tmp_path / "jobs"))
    assert not any(method == "DELETE" for method, _, _ in kubernetes.calls)  # cleanup: on_success


def test_an_image_that_cannot_be_pulled_fails_at_once(kubernetes: FakeKubernetes, tmp_path: Path) -> None:
    kubernetes.pod_phase, kubernetes.waiting_reason = "Pending", "ImagePullBackOff"
    started = time.monotonic()
    with pytest.raises(UserError, match=r"cannot start: ImagePullBackOff: image not found"):
        run_pytorchjob("ppo", JOB, distributed(cleanup="always"), str(tmp_path / "jobs"))
    assert time.monotonic() - started < 10
    assert kubernetes.calls[-1][0] == "DELETE"


def test_pods_that_never_run_fail_after_the_pending_timeout(
    kubernetes: FakeKubernetes, tmp_path: Path
) -> None:
    kubernetes.pod_phase = "Pending"
    started = time.monotonic()
    with pytest.raises(UserError, match=r"still has pods not running after 1 s"):
        run_pytorchjob("ppo", JOB, distributed(pending_timeout_seconds=1), str(tmp_path / "jobs"))
    assert time.monotonic() - started < 10


def test_no_kubeconfig_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError, match=r"no Kubernetes credentials: not in a cluster and no usable kube"):
        run_pytorchjob("ppo", JOB, distributed(), str(tmp_path / "jobs"))
