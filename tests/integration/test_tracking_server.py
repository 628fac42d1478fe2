"""`tracking` against a real `mlflow server` whose artifacts are proxied to the moto S3 bucket."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from pydantic import Field

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import (
    RunContext,
    TrackingConfig,
    check_reachable,
    finish_pipeline_run,
    log_metrics,
    start_pipeline_run,
    step_run,
)

from .conftest import MlflowServer, S3Server, free_port

pytestmark = pytest.mark.integration


class _Optimizer(StrictModel):
    learning_rate: float = 1e-3
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])


class _StepConfig(StrictModel):
    epochs: int = 2
    name: str = "tiny"
    optimizer: _Optimizer = Field(default_factory=_Optimizer)


@pytest.fixture
def tracking(mlflow_server: MlflowServer) -> TrackingConfig:
    # A fresh experiment per test: the server is shared by the whole session.
    return TrackingConfig(uri=mlflow_server.url, experiment=f"it-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def context(tracking: TrackingConfig, tmp_path: Path) -> RunContext:
    uri, run_id = start_pipeline_run(tracking, "it-pipeline", {"seed": 3}, {})
    return RunContext(
        tracking_uri=uri, experiment=tracking.experiment, parent_run_id=run_id, output_root=str(tmp_path)
    )


def test_start_pipeline_run_creates_parent_with_flattened_params(
    tracking: TrackingConfig, mlflow_server: MlflowServer
) -> None:
    params = {"ppo": {"kl_coef": 0.05, "sampling": {"top_k": 0}}, "seed": 7, "name": "demo"}
    uri, run_id = start_pipeline_run(tracking, "pipeline-run", params, {"rlhf.trigger": "test"})
    assert uri == mlflow_server.url

    run = mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id)
    assert run.data.params == {"ppo.kl_coef": "0.05", "ppo.sampling.top_k": "0", "seed": "7", "name": "demo"}
    assert run.data.tags["rlhf.kind"] == "pipeline"
    assert run.data.tags["rlhf.trigger"] == "test"
    assert run.data.tags["mlflow.runName"] == "pipeline-run"
    assert run.info.status == "RUNNING"  # left open for the steps
    experiment = mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.experiment


def test_start_pipeline_run_reuses_the_experiment(
    tracking: TrackingConfig, mlflow_server: MlflowServer
) -> None:
    _, first = start_pipeline_run(tracking, "a", {}, {})
    _, second = start_pipeline_run(tracking, "b", {}, {})
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_run(first).info.experiment_id == client.get_run(second).info.experiment_id


def test_step_run_is_a_child_with_config_params_and_stepped_metrics(
    context: RunContext, mlflow_server: MlflowServer
) -> None:
    with step_run(context, "train_reward_model", _StepConfig()) as run:
        child_id = run.info.run_id
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            log_metrics({"loss": loss, "accuracy": 1.0 - loss}, step=step)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    child = client.get_run(child_id)
    assert child_id != context.parent_run_id
    assert child.data.tags["mlflow.parentRunId"] == context.parent_run_id
    assert child.data.tags["rlhf.step"] == "train_reward_model"
    assert child.data.tags["mlflow.runName"] == "train_reward_model"
    assert child.info.status == "FINISHED"
    assert child.data.params == {
        "epochs": "2",
        "name": "tiny",
        "optimizer.learning_rate": "0.001",
        "optimizer.betas": "[0.9, 0.95]",
    }
    history = client.get_metric_history(child_id, "loss")
    by_step = sorted(history, key=lambda m: m.step)
    assert [(m.step, m.value) for m in by_step] == [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert child.data.metrics["accuracy"] == pytest.approx(0.75)  # latest value
    # The child is filed under the parent's experiment, where the UI nests it.
    assert child.info.experiment_id == client.get_run(context.parent_run_id).info.experiment_id


def test_failed_step_marks_child_failed(context: RunContext, mlflow_server: MlflowServer) -> None:
    with pytest.raises(RuntimeError, match="boom"), step_run(context, "ppo", _StepConfig()) as run:
        child_id = run.info.run_id
        raise RuntimeError("boom")
    assert mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_run(child_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_step_artifacts_land_in_the_s3_bucket(
    context: RunContext, mlflow_server: MlflowServer, s3_server: S3Server
) -> None:
    with step_run(context, "evaluate", _StepConfig()) as run:
        child_id = run.info.run_id
        mlflow.log_text("win rate 0.62\n", "reports/eval.txt")
        mlflow.log_dict({"win_rate": 0.62}, "summary.json")

    # The server proxies artifacts (mlflow-artifacts:/); the client never talks to S3 itself.
    assert (
        mlflow.MlflowClient(tracking_uri=mlflow_server.url)
        .get_run(child_id)
        .info.artifact_uri.startswith("mlflow-artifacts:")
    )
    under_run = [
        uri
        for uri in storage.list_files(s3_server.uri(mlflow_server.artifacts_prefix) + "/")
        if f"/{child_id}/artifacts/" in uri
    ]
    by_name = {uri.split(f"/{child_id}/artifacts/", 1)[1]: uri for uri in under_run}
    assert set(by_name) == {"reports/eval.txt", "summary.json"}
    assert storage.read_text(by_name["reports/eval.txt"]) == "win rate 0.62\n"
    assert storage.read_json(by_name["summary.json"]) == {"win_rate": 0.62}
    # And they are readable back through the tracking server too.
    assert mlflow.artifacts.load_text(f"runs:/{child_id}/reports/eval.txt") == "win rate 0.62\n"


def test_check_reachable(mlflow_server: MlflowServer) -> None:
    assert check_reachable(mlflow_server.url) is None  # healthy server: no error
    with_credentials = mlflow_server.url.replace("http://", "http://admin:p%40ss@")
    assert check_reachable(with_credentials) is None  # sent as a basic-auth header, which this server ignores
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed
    with pytest.raises(UserError, match="unreachable") as caught:
        check_reachable(closed)
    assert closed in str(caught.value)


def test_start_pipeline_run_on_a_down_server_is_one_line_after_the_retry_window() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    expected = rf"^MLflow tracking server {closed} did not answer for 0 s \(Connection refused\); tracking\."
    with pytest.raises(UserError, match=expected):
        start_pipeline_run(TrackingConfig(uri=closed, experiment="x", retry_window_s=0), "r", {}, {})


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_finish_pipeline_run_sets_parent_status(
    context: RunContext, mlflow_server: MlflowServer, status: str
) -> None:
    with step_run(context, "collect_prompts", _StepConfig()):
        pass
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_run(context.parent_run_id).info.status == "RUNNING"
    finish_pipeline_run(context, status=status)
    parent = client.get_run(context.parent_run_id)
    assert parent.info.status == status
    assert parent.info.end_time is not None
