"""A tiny HTTP server, started inside a test on 127.0.0.1, that plays the Kubernetes API server for the
`trainjob` and `pytorchjob` launchers. It RECORDS every request the kubernetes client makes for us and
answers with the minimal JSON the client needs:

    POST   /apis/GROUP/VERSION/namespaces/NS/PLURAL            the job, echoed back
    GET    /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME       status: running, then the scenario's end
    GET    /api/v1/namespaces/NS/pods?labelSelector=...        the scenario's pods
    GET    /api/v1/namespaces/NS/pods/POD/log?follow=true      a few log lines
    DELETE /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME       {}

Where the scenario ends in success the server writes rank 0's outputs where the job's command says, as rank
0's pod would; where it ends in failure it leaves a worker's error report. So the tests pin down what we send
and how we wait, log, clean up and fail, NOT whether a cluster, the Training Operator or Kubeflow Trainer
would run it.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rlhf_components.core import storage

PODS = "/api/v1/namespaces/team/pods"


@dataclass
class FakeKubernetes:
    """Scenario: the job ends `succeeded` (the kind's condition) or Failed; its pods are in `pod_phase`,
    their container waiting for `waiting_reason` when set."""

    jobs: str  # the job collection's path
    succeeded: str
    command_of: Callable[[dict[str, Any]], list[str]]  # rank 0's command line, from the manifest
    env_of: Callable[[dict[str, Any]], list[dict[str, Any]]]  # a worker's environment, from the manifest
    pods_of: Callable[[str], list[tuple[str, dict[str, str]]]]  # (pod name, labels) of a job's pods
    end: str = "succeeded"
    pod_phase: str = "Running"
    waiting_reason: str | None = None
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    status_reads: int = 0

    def argument(self, flag: str) -> str:
        command = self.command_of(self.manifest)
        return str(command[command.index(flag) + 1])

    def status(self) -> dict[str, Any]:
        self.status_reads += 1
        if self.status_reads == 1 or self.pod_phase != "Running":
            return {"conditions": [{"type": "Created", "status": "True"}]}
        if self.end == "succeeded":
            storage.write_json(self.argument("--outputs"), {"answer": 42})
            return {"conditions": [{"type": self.succeeded, "status": "True"}]}
        errors = next(e["value"] for e in self.env_of(self.manifest) if e["name"] == "RLHF_WORKER_ERROR_DIR")
        storage.write_json(f"{errors}/rank-1.json", {"time": 1.0, "reason": "RuntimeError: out of memory"})
        return {"conditions": [{"type": "Failed", "status": "True", "message": "node 1 exited"}]}

    def pods(self) -> dict[str, Any]:
        waiting = {"waiting": {"reason": self.waiting_reason, "message": "image not found"}}
        state = waiting if self.waiting_reason else {"running": {}}
        statuses = [
            {"name": "c", "state": state, "ready": False, "restartCount": 0, "image": "x", "imageID": ""}
        ]
        items = [
            {
                "metadata": {"name": name, "namespace": "team", "labels": labels},
                "status": {"phase": self.pod_phase, "containerStatuses": statuses},
            }
            for name, labels in self.pods_of(self.manifest["metadata"]["name"])
        ]
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}


@contextmanager
def serving(
    fake: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeKubernetes]:
    """The fake API server on a free port, and a kubeconfig naming it."""

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
            if path == f"{fake.jobs}/{name}":
                self._reply(200, {**fake.manifest, "status": fake.status()})
            elif path == PODS:
                self._reply(200, fake.pods())
            elif path.startswith(PODS) and path.endswith("/log"):
                self._reply(200, b"step 1: loss 0.7\nstep 2: loss 0.5\n", "text/plain")
            else:
                self._reply(404, {"kind": "Status", "code": 404})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    cluster = {"server": f"http://127.0.0.1:{server.server_port}"}
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        yield fake
    finally:
        server.shutdown()
