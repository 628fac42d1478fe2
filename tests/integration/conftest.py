"""Real servers for the integration layer (DESIGN §5): a moto S3 server and an `mlflow server`.

Both bind to 127.0.0.1 on free ports, are started once per session and are always stopped at the end
(terminate, then kill), so no test run leaves processes behind. Their output goes to a log file whose tail
is put into the error when a server does not come up, because "timed out" alone is undiagnosable in CI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rlhf_components.core import storage

BUCKET = "rlhf-integration"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables this layer sets for the session; saved and restored so later test layers see the original env.
# AWS_ENDPOINT_URL_S3 would take precedence over AWS_ENDPOINT_URL in boto3, so it is cleared while we run.
_SESSION_ENV_KEYS = (*AWS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


# Server start-up times, reported at the end of the run: a slow start is the first sign of a CI regression.
START_SECONDS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if START_SECONDS:
        started = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in START_SECONDS.items())
        terminalreporter.write_line(f"integration servers started in: {started}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration is `integration`, whether or not its module says so."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(part.strip("/") for part in parts)])


@dataclass(frozen=True)
class MlflowServer:
    url: str
    artifacts_prefix: str
    start_seconds: float


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it; the tiny race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path, lines: int = 60) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Terminate the server's own process group (uvicorn may fork workers), then kill if it lingers."""
    if process.poll() is not None:
        return
    # start_new_session=True made the server the leader of its own group: its id is the server's pid.
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    # Workers left in the group after the leader exited are ours too; make sure none survive.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_until(
    check: Callable[[], bool], process: subprocess.Popen[bytes], name: str, log_path: Path, timeout: float
) -> float:
    """Seconds until `check()` is true; fails with the log tail if the server dies or never answers."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {process.returncode} during start-up; "
                f"log tail:\n{_log_tail(log_path)}"
            )
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not answer within {timeout:.0f} s; log tail:\n{_log_tail(log_path)}")


def _answers_http(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP status means the server is listening and speaking HTTP
        except (urllib.error.URLError, OSError):
            return False

    return check


def _healthy(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def _start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_file = log_path.open("wb")
    try:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log_file.close()  # the child holds its own copy of the descriptor


def _s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 over real HTTP, with the AWS env pointing boto3 (and so `storage`) at it for the session."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = Path(sys.executable).parent / "moto_server"
    command = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    process = _start([*command, "-H", "127.0.0.1", "-p", str(port)], {**os.environ, **AWS_ENV}, log_path)
    saved = {key: os.environ.get(key) for key in _SESSION_ENV_KEYS}
    try:
        seconds = _wait_until(_answers_http(endpoint + "/"), process, "moto_server", log_path, timeout=30)
        START_SECONDS["moto S3"] = seconds
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            os.environ.pop(key, None)
        os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
        # storage.s3_client() is cached: drop any client built before the env pointed at moto.
        storage.s3_client.cache_clear()
        _s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint=endpoint, bucket=BUCKET)
    finally:
        _stop(process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.s3_client.cache_clear()


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server`: sqlite backend, artifacts proxied to the moto bucket, one worker, no job runner."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("mlflow-server")
    log_path = root / "mlflow-server.log"
    artifacts_prefix = "mlflow-artifacts"
    env = {
        **os.environ,
        **AWS_ENV,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        # The job runner and extra workers triple the start time and memory (DESIGN §5) and are unused here.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # A tracking URI inherited from a test process must not redirect the server's own client code.
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        s3_server.uri(artifacts_prefix),
    ]
    process = _start(command, env, log_path)
    try:
        seconds = _wait_until(_healthy(url + "/health"), process, "mlflow server", log_path, timeout=90)
        START_SECONDS["mlflow server"] = seconds
        yield MlflowServer(url=url, artifacts_prefix=artifacts_prefix, start_seconds=seconds)
    finally:
        _stop(process)


@contextlib.contextmanager
def restored_mlflow_state() -> Iterator[None]:
    """Undo what the body does to MLflow's process-global state: tracking URI, its env var, active runs.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; left behind, it would send later test layers
    (and `resolve_tracking_uri`'s default) to a server that no longer exists.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = tracking_utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@pytest.fixture(autouse=True)
def _isolated_mlflow_state() -> Iterator[None]:
    with restored_mlflow_state():
        yield
