"""`runner.submit` / `runner.schedule`: the KFP REST requests we send. NOT a test of a real KFP backend.

A tiny HTTP server, started inside the test on 127.0.0.1, RECORDS every request that `kfp.Client` (kfp 2.17,
KFP API v2beta1) makes for us and answers with the minimal JSON the client needs to go on:

    GET  /apis/v2beta1/healthz                      {"multi_user": false}
    GET  /apis/v2beta1/experiments?filter=...       the experiments whose display_name matches the filter
    POST /apis/v2beta1/experiments                  the experiment, with a new experiment_id
    POST /apis/v2beta1/runs                         {"run_id": ...}
    POST /apis/v2beta1/recurringruns                {"recurring_run_id": ...}
    POST /apis/v2beta1/pipelines/upload             {"pipeline_id": ...} (multipart; recorded, unused today:
                                                    the client sends the compiled spec inline in the run)

So these tests pin down what we send (the compiled spec, the `config` runtime parameter, the cron, the
experiment handling) and how we fail, not whether a KFP server would accept or run it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kfp
import pytest
import yaml

from rlhf_components.core.config import Reward
from rlhf_components.core.errors import UserError
from rlhf_components.grpo.config import Config as GRPOConfig
from rlhf_pipelines import cli as cli_module
from rlhf_pipelines import runner
from rlhf_pipelines.config import PipelineConfig, load_pipeline_config

from ._helpers import CliResult

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo.yaml"
RLHF = Path(sys.executable).parent / "rlhf"
CLI_TIMEOUT_S = 180
API = "/apis/v2beta1"
TASKS = {
    "start-run",
    "collect-prompts",
    "generate-candidates",
    "ingest-feedback",
    "train-reward-model",
    "ppo",
    "evaluate",
    "register-and-promote",
}
# kfp.Client warns on every construction that it needs a v2 backend; noise here, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")

AWS_KEY_ID = "AKIATESTKEYID7Q2W9E4R"
AWS_SECRET = "test-secret-key-that-must-never-leave-0f9e8d7c"


# ----------------------------------------------------------------------------- the recording fake


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeKfp:
    """State and request log of the fake KFP API; `url` is its http://127.0.0.1:<port> address."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    # (method, path) -> (status, body): answer this route with an error instead.
    failures: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    def next_id(self, kind: str) -> str:
        self._counter += 1
        return f"{kind}-{self._counter}"

    def calls(self) -> list[tuple[str, str]]:
        return [(request.method, request.path) for request in self.requests]

    def bodies(self, method: str, path: str) -> list[Any]:
        return [r.json() for r in self.requests if (r.method, r.path) == (method, path)]

    def answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(request)
            route = (request.method, request.path)
            if route in self.failures:
                return self.failures[route]
            if route == ("GET", f"{API}/healthz"):
                return 200, {"multi_user": False, "pipeline_store": "database"}
            if route == ("GET", f"{API}/experiments"):
                wanted = _display_name_filter(request.query)
                found = [e for e in self.experiments if wanted is None or e["display_name"] == wanted]
                return 200, ({"experiments": found, "total_size": len(found)} if found else {})
            if route == ("POST", f"{API}/experiments"):
                experiment = {**request.json(), "experiment_id": self.next_id("experiment")}
                self.experiments.append(experiment)
                return 200, experiment
            if route == ("POST", f"{API}/runs"):
                body = request.json()
                return 200, {
                    "run_id": self.next_id("run"),
                    "display_name": body.get("display_name"),
                    "experiment_id": body.get("experiment_id"),
                }
            if route == ("POST", f"{API}/recurringruns"):
                body = request.json()
                return 200, {
                    "recurring_run_id": self.next_id("recurring"),
                    "display_name": body.get("display_name"),
                    "experiment_id": body.get("experiment_id"),
                }
            if route == ("POST", f"{API}/pipelines/upload"):
                name = request.query.get("name", ["pipeline"])[0]
                return 200, {"pipeline_id": self.next_id("pipeline"), "display_name": name}
            return 404, {"error": f"fake KFP: no route {route}", "code": 5, "message": "not found"}


def _display_name_filter(query: dict[str, list[str]]) -> str | None:
    if "filter" not in query:
        return None
    predicates = json.loads(query["filter"][0]).get("predicates", [])
    for predicate in predicates:
        if predicate.get("key") == "display_name":
            return str(predicate.get("stringValue", predicate.get("string_value")))
    return None


def _handler(fake: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
            body = self.rfile.read(length) if length else b""
            request = Request(self.command, parts.path, query, dict(self.headers.items()), body)
            status, payload = fake.answer(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serving() -> Iterator[FakeKfp]:
    """A fake KFP on a free 127.0.0.1 port, served from a thread; shut down and closed on exit."""
    fake = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def fake_kfp() -> Iterator[FakeKfp]:
    with serving() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _isolated_kfp_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.config/kfp/context.json and no KF_PIPELINES_* variables of the user's leak into a test."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for key in list(os.environ):
        if key.startswith("KF_PIPELINES_"):
            monkeypatch.delenv(key)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ----------------------------------------------------------------------------- configs


def kubernetes_config(**updates: Any) -> PipelineConfig:
    """examples/demo.yaml with an MLflow server and S3 storage, as on Kubernetes; `updates` on top."""
    demo = load_pipeline_config(DEMO_CONFIG)
    base = demo.model_copy(
        update={
            "tracking": demo.tracking.model_copy(update={"uri": "http://mlflow.example:5000"}),
            "storage_root": "s3://bucket/runs",
            "feedback_inbox": "s3://bucket/inbox",
            "policy": "s3://bucket/models/sft",
            "demo_assets": None,
            "collect_prompts": demo.collect_prompts.model_copy(update={"sources": ["s3://bucket/prompts/"]}),
        }
    )
    return base.model_copy(update=updates)


def pipeline_spec(body: dict[str, Any]) -> dict[str, Any]:
    """The PipelineSpec in a run / recurring run body (nested when a platform spec rides along)."""
    spec: dict[str, Any] = body["pipeline_spec"]
    return spec["pipeline_spec"] if "pipeline_spec" in spec and "platform_spec" in spec else spec


def assert_no_secrets_sent(fake: FakeKfp) -> None:
    for request in fake.requests:
        sent = request.path + json.dumps(request.query) + request.body.decode("utf-8", errors="replace")
        assert AWS_SECRET not in sent, request.path
        assert AWS_KEY_ID not in sent, request.path


# ----------------------------------------------------------------------------- submit


def test_submit_request_sends_all_tasks_and_config_parameter_without_secrets(
    fake_kfp: FakeKfp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    config = kubernetes_config()

    run_id = runner.submit(config, fake_kfp.url, "rlhf-tests")

    assert fake_kfp.calls() == [
        ("GET", f"{API}/healthz"),  # our reachability check, before kfp.Client
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    [experiment] = fake_kfp.bodies("POST", f"{API}/experiments")
    assert experiment["display_name"] == "rlhf-tests"
    [run] = fake_kfp.bodies("POST", f"{API}/runs")
    assert run_id == "run-2"  # the id the (fake) server answered, after experiment-1
    assert run["experiment_id"] == "experiment-1"
    assert run["display_name"] == f"{config.name}-{config.config_hash()}"
    spec = pipeline_spec(run)
    assert set(spec["root"]["dag"]["tasks"]) == TASKS
    assert spec["pipelineInfo"]["name"] == "rlhf"
    # submit turns caching off for every task: a retraining run must not replay last week's outputs.
    for name, task in spec["root"]["dag"]["tasks"].items():
        assert not task.get("cachingOptions", {}).get("enableCache", False), name
    parameters = run["runtime_config"]["parameters"]
    assert parameters == {"config": config.to_json()}
    sent_config = json.loads(parameters["config"])
    assert sent_config["tracking"]["uri"] == "http://mlflow.example:5000"
    assert sent_config["storage_root"] == "s3://bucket/runs"
    assert sent_config["feedback_inbox"] == "s3://bucket/inbox"
    assert PipelineConfig.model_validate(sent_config) == config
    assert_no_secrets_sent(fake_kfp)


def test_submit_request_reuses_an_existing_experiment(fake_kfp: FakeKfp) -> None:
    fake_kfp.experiments.append({"experiment_id": "experiment-existing", "display_name": "rlhf-tests"})

    runner.submit(kubernetes_config(), fake_kfp.url, "rlhf-tests")

    assert ("POST", f"{API}/experiments") not in fake_kfp.calls()
    [run] = fake_kfp.bodies("POST", f"{API}/runs")
    assert run["experiment_id"] == "experiment-existing"


@pytest.mark.parametrize(
    ("tracking_uri", "storage_root", "feedback_inbox", "field_name"),
    [
        (None, "s3://bucket/runs", "s3://bucket/inbox", "tracking.uri"),
        ("sqlite:///mlflow.db", "s3://bucket/runs", "s3://bucket/inbox", "tracking.uri"),
        ("file:///tmp/mlruns", "s3://bucket/runs", "s3://bucket/inbox", "tracking.uri"),
        ("http://mlflow.example:5000", "/tmp/rlhf-runs", "s3://bucket/inbox", "storage_root"),
        ("http://mlflow.example:5000", "s3://bucket/runs", ".rlhf-runs/inbox", "feedback_inbox"),
        ("http://admin:hunter2@mlflow.example:5000", "s3://bucket/runs", "s3://bucket/inbox", "tracking.uri"),
    ],
)
def test_submit_refuses_local_tracking_or_storage_before_any_request(
    fake_kfp: FakeKfp, tracking_uri: str | None, storage_root: str, feedback_inbox: str, field_name: str
) -> None:
    base = kubernetes_config()
    config = base.model_copy(
        update={
            "tracking": base.tracking.model_copy(update={"uri": tracking_uri}),
            "storage_root": storage_root,
            "feedback_inbox": feedback_inbox,
        }
    )
    with pytest.raises(UserError) as raised:
        runner.submit(config, fake_kfp.url, "rlhf-tests")
    assert str(raised.value).startswith(f"{field_name}: ") and "hunter2" not in str(raised.value)
    assert fake_kfp.requests == []


def test_submit_refuses_a_local_model_anywhere_before_any_request(fake_kfp: FakeKfp) -> None:
    rewards = [Reward(function="length"), Reward(reward_model="/home/me/rm")]
    config = kubernetes_config(pipeline="grpo", grpo=GRPOConfig(rewards=rewards))
    with pytest.raises(UserError, match=r"^grpo\.rewards\[1\]\.reward_model: .* an s3:// or models:/ model"):
        runner.submit(config, fake_kfp.url, "rlhf-tests")
    with pytest.raises(UserError, match=r"^reward_model: .* needs an s3:// or models:/"):
        runner.submit(kubernetes_config(reward_model="rm"), fake_kfp.url, "rlhf-tests")
    assert fake_kfp.requests == []


def test_submit_to_unreachable_host_is_a_one_line_user_error() -> None:
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(UserError) as raised:
        runner.submit(kubernetes_config(), host, "rlhf-tests")
    message = str(raised.value)
    assert message.startswith(f"KFP endpoint {host}")
    assert "\n" not in message


def test_submit_rejected_by_kfp_is_a_one_line_user_error(fake_kfp: FakeKfp) -> None:
    fake_kfp.failures[("POST", f"{API}/runs")] = (
        403,
        {"error": "forbidden", "code": 7, "message": "user is not authorized"},
    )
    try:
        runner.submit(kubernetes_config(), fake_kfp.url, "rlhf-tests")
    except UserError as error:
        assert "403" in str(error) and "\n" not in str(error)
    else:
        pytest.fail("a 403 from KFP was reported as success")


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("cron", "sent_cron"), [("0 0 3 * * 1", "0 0 3 * * 1"), ("0 3 * * 1", "0 0 3 * * 1")]
)
def test_schedule_request_creates_missing_experiment_and_sends_recurring_run(
    fake_kfp: FakeKfp, monkeypatch: pytest.MonkeyPatch, cron: str, sent_cron: str
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    config = kubernetes_config()

    recurring_id = runner.schedule(config, fake_kfp.url, cron, "weekly")

    assert fake_kfp.calls() == [
        ("GET", f"{API}/healthz"),  # our reachability check, before kfp.Client
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/recurringruns"),
    ]
    lookup = next(r for r in fake_kfp.requests if r.path == f"{API}/experiments")
    assert _display_name_filter(lookup.query) == "weekly"
    [experiment] = fake_kfp.bodies("POST", f"{API}/experiments")
    assert experiment["display_name"] == "weekly"
    [recurring] = fake_kfp.bodies("POST", f"{API}/recurringruns")
    assert recurring_id == "recurring-2"
    assert recurring["experiment_id"] == "experiment-1"
    assert recurring["display_name"] == f"{config.name}-retraining"
    assert recurring["trigger"] == {"cron_schedule": {"cron": sent_cron}}
    assert len(recurring["trigger"]["cron_schedule"]["cron"].split()) == 6
    assert int(recurring["max_concurrency"]) == 1
    assert recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE"
    assert recurring["runtime_config"]["parameters"] == {"config": config.to_json()}
    assert set(pipeline_spec(recurring)["root"]["dag"]["tasks"]) == TASKS
    assert_no_secrets_sent(fake_kfp)


def test_schedule_request_reuses_an_existing_experiment(fake_kfp: FakeKfp) -> None:
    fake_kfp.experiments.append({"experiment_id": "experiment-existing", "display_name": "weekly"})
    fake_kfp.experiments.append({"experiment_id": "experiment-other", "display_name": "other"})

    runner.schedule(kubernetes_config(), fake_kfp.url, "0 0 3 * * 1", "weekly")

    assert ("POST", f"{API}/experiments") not in fake_kfp.calls()
    [recurring] = fake_kfp.bodies("POST", f"{API}/recurringruns")
    assert recurring["experiment_id"] == "experiment-existing"


def test_schedule_with_four_field_cron_is_a_user_error_and_sends_no_recurring_run(fake_kfp: FakeKfp) -> None:
    with pytest.raises(UserError, match=r"--cron '0 3 \* \*': expected 6 fields"):
        runner.schedule(kubernetes_config(), fake_kfp.url, "0 3 * *", "weekly")
    assert ("POST", f"{API}/recurringruns") not in fake_kfp.calls()


def test_schedule_with_bad_cron_sends_no_request_at_all(fake_kfp: FakeKfp) -> None:
    with pytest.raises(UserError):
        runner.schedule(kubernetes_config(), fake_kfp.url, "0 3 * *", "weekly")
    assert fake_kfp.requests == []


def test_schedule_refuses_sqlite_tracking_before_any_request(fake_kfp: FakeKfp) -> None:
    base = kubernetes_config()
    config = base.model_copy(update={"tracking": base.tracking.model_copy(update={"uri": "sqlite:///m.db"})})
    with pytest.raises(UserError, match=r"^tracking\.uri: "):
        runner.schedule(config, fake_kfp.url, "0 0 3 * * 1", "weekly")
    assert fake_kfp.requests == []


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("0 3 * * 1", "0 0 3 * * 1"),
        ("0 0 3 * * 1", "0 0 3 * * 1"),
        ("  */15  *  * * *  ", "0 */15 * * * *"),
        ("30 0 9 ? * 2-6", "30 0 9 ? * 2-6"),
    ],
)
def test_kfp_cron_gives_six_fields(expression: str, expected: str) -> None:
    assert runner.kfp_cron(expression) == expected


@pytest.mark.parametrize("expression", ["", "0 3 * *", "0 0 0 3 * * 1"])
def test_kfp_cron_rejects_other_field_counts(expression: str) -> None:
    with pytest.raises(UserError, match="expected 6 fields"):
        runner.kfp_cron(expression)


# ----------------------------------------------------------------------------- the CLI


def kubernetes_yaml(path: Path) -> Path:
    data = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    data["tracking"]["uri"] = "http://mlflow.example:5000"
    data["storage_root"], data["feedback_inbox"] = "s3://bucket/runs", "s3://bucket/inbox"
    data["policy"] = "s3://bucket/models/sft"
    data["collect_prompts"]["sources"] = ["s3://bucket/prompts/"]
    del data["demo_assets"]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class BackgroundCli:
    """One `rlhf` subprocess (the installed console script), started now and waited for on first use."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        with (cwd / "cli.stdout").open("wb") as out, (cwd / "cli.stderr").open("wb") as err:
            self.process = subprocess.Popen([str(RLHF), *args], cwd=cwd, env=env, stdout=out, stderr=err)
        self._result: CliResult | None = None

    def result(self) -> CliResult:
        if self._result is None:
            returncode = self.process.wait(timeout=CLI_TIMEOUT_S)
            self._result = CliResult(
                returncode,
                (self.cwd / "cli.stdout").read_text(encoding="utf-8"),
                (self.cwd / "cli.stderr").read_text(encoding="utf-8"),
            )
        return self._result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module", autouse=True)
def unreachable_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundCli]:
    """`rlhf submit` to a closed port, started when the module starts so that its seconds of imports
    overlap the in-process tests."""
    cwd = tmp_path_factory.mktemp("kfp-cli-unreachable")
    env = {key: value for key, value in os.environ.items() if not key.startswith("KF_PIPELINES_")}
    env["HOME"] = str(cwd)  # no ~/.config/kfp/context.json of the user's
    args = [
        "submit",
        str(kubernetes_yaml(cwd / "config.yaml")),
        "--host",
        f"http://127.0.0.1:{closed_port()}",
    ]
    background = BackgroundCli(args, cwd, env)
    try:
        yield background
    finally:
        background.stop()


def test_cli_submit_to_unreachable_host_fails_without_traceback(unreachable_cli: BackgroundCli) -> None:
    result = unreachable_cli.result()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr_lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: KFP endpoint http://127.0.0.1:")
    assert "submitted run" not in result.stdout


def test_cli_submit_to_unreachable_host_prints_exactly_one_stderr_line(
    unreachable_cli: BackgroundCli,
) -> None:
    result = unreachable_cli.result()
    assert len(result.stderr_lines) == 1, result.stderr


def test_cli_submit_request_reaches_fake_kfp_and_prints_run_id(
    fake_kfp: FakeKfp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rlhf submit` through the console script's entry point (`rlhf_pipelines.cli:main`), in this process:
    a fresh `rlhf` process spends seconds importing torch."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.chdir(tmp_path)
    kubernetes_yaml(tmp_path / "config.yaml")
    monkeypatch.setattr(
        sys, "argv", ["rlhf", "submit", "config.yaml", "--host", fake_kfp.url, "--experiment", "cli-tests"]
    )
    monkeypatch.setattr(cli_module, "setup_logging", lambda: None)

    cli_module.main()  # returns normally on success; errors end in SystemExit

    stdout = capsys.readouterr().out
    [run] = fake_kfp.bodies("POST", f"{API}/runs")
    assert "submitted run run-2 to" in stdout
    assert set(pipeline_spec(run)["root"]["dag"]["tasks"]) == TASKS
    sent_config = json.loads(run["runtime_config"]["parameters"]["config"])
    assert sent_config["name"] == "demo"
    assert sent_config["tracking"]["uri"] == "http://mlflow.example:5000"
    [experiment] = fake_kfp.bodies("POST", f"{API}/experiments")
    assert experiment["display_name"] == "cli-tests"
    assert_no_secrets_sent(fake_kfp)
