"""The S3 endpoint and the MLflow server going away in the middle of a step: an outage shorter than the
retry window is waited out and the step succeeds; a longer one ends the step in one line, and a trainer
saves its progress first so that a retry resumes where it stopped."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from rlhf_components import collect_prompts, train_reward_model
from rlhf_components.core import checkpoint, storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run
from rlhf_components.demo import DemoAssets

from .conftest import MlflowServer, S3Server, restored_mlflow_state
from .outage import Outage

PROMPTS = [{"prompt": f"Review of restaurant number {i}:"} for i in range(20)]


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _back_up_after(outage: Outage, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, outage.up)
    timer.start()
    return timer


@pytest.fixture
def s3_outage(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    """boto3 (and so `storage`) reaches moto through a forwarder the test can take down."""
    outage = Outage(_port(s3_server.endpoint))
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.url)
    storage.s3_client.cache_clear()
    with restored_mlflow_state():
        yield outage
    outage.down()
    storage.s3_client.cache_clear()


@pytest.fixture
def mlflow_outage(mlflow_server: MlflowServer) -> Iterator[Outage]:
    outage = Outage(_port(mlflow_server.url))
    with restored_mlflow_state():
        yield outage
    outage.down()


def _context(tracking_uri: str, output_root: str, window_s: float) -> RunContext:
    tracking = TrackingConfig(uri=tracking_uri, experiment="outages", retry_window_s=window_s)
    uri, parent = start_pipeline_run(tracking, "outage", {}, {})
    return RunContext(
        tracking_uri=uri,
        experiment="outages",
        parent_run_id=parent,
        output_root=output_root,
        tracking_retry_window_s=window_s,
    )


def test_an_s3_outage_inside_the_retry_window_is_waited_out(
    s3_outage: Outage,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("RLHF_S3_RETRY_WINDOW_S", "30")
    root = s3_server.uri("outages", uuid.uuid4().hex)
    storage.write_jsonl(f"{root}/prompts.jsonl", PROMPTS)
    context = _context(f"sqlite:///{tmp_path / 'mlflow.db'}", f"{root}/runs", window_s=30)
    s3_outage.down()
    _back_up_after(s3_outage, 3.0)
    config = collect_prompts.Config(sources=[f"{root}/prompts.jsonl"], eval_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        outputs = collect_prompts.run(config, collect_prompts.Inputs(), context)
    read = [row for uri in (outputs.train, outputs.eval) for _, row in storage.read_jsonl(uri)]
    assert len(read) == len(PROMPTS) and outputs.train.startswith("s3://")
    assert any(
        "failed (Could not connect" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records
    )


def test_an_s3_outage_past_the_retry_window_is_one_line(
    s3_outage: Outage, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLHF_S3_RETRY_WINDOW_S", "2")
    uri = s3_server.uri("outages", uuid.uuid4().hex, "prompts.jsonl")
    storage.write_jsonl(uri, PROMPTS)
    s3_outage.down()
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        storage.read_text(uri)
    assert time.monotonic() - started >= 2.0  # it did wait the window out
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{uri}: S3 GET failed for 2 s (Could not connect")
    assert message.endswith("RLHF_S3_RETRY_WINDOW_S sets how long to retry")


def test_a_bad_s3_retry_window_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_S3_RETRY_WINDOW_S", "a minute")
    with pytest.raises(UserError, match=r"^RLHF_S3_RETRY_WINDOW_S: 'a minute' is not a number of seconds"):
        storage.read_text("s3://bucket/key")


def test_an_mlflow_outage_inside_the_retry_window_is_waited_out(
    mlflow_outage: Outage, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    storage.write_jsonl(str(prompts), PROMPTS)
    context = _context(mlflow_outage.url, str(tmp_path / "runs"), window_s=30)
    mlflow_outage.down()
    _back_up_after(mlflow_outage, 3.0)
    config = collect_prompts.Config(sources=[str(prompts)], eval_fraction=0.25)
    outputs = collect_prompts.run(config, collect_prompts.Inputs(), context)
    assert outputs.train.endswith("train.jsonl")
    client = mlflow.MlflowClient(mlflow_server.url)  # not through the forwarder
    [step] = client.search_runs(
        [client.get_experiment_by_name("outages").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{context.parent_run_id}'",
    )
    assert step.info.status == "FINISHED" and step.data.metrics["read"] == len(PROMPTS)


def _take_down_once_training_logs(outage: Outage, server: MlflowServer, parent: str, steps: int) -> None:
    """Watch the step's metrics on the server itself; take the forwarder down after `steps` are logged."""
    client = mlflow.MlflowClient(server.url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("outages")
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
        )
        if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= steps:
            outage.down()
            return
        time.sleep(0.05)


def test_an_mlflow_outage_past_the_window_mid_training_keeps_the_progress_and_a_retry_resumes(
    mlflow_outage: Outage,
    mlflow_server: MlflowServer,
    tiny_assets: DemoAssets,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    storage.write_jsonl(str(pairs), [{"prompt": "Review:", "chosen": " lovely", "rejected": " awful"}] * 4)
    base = tiny_assets.sft_model_dir
    inputs = train_reward_model.Inputs(base_model=base, train=str(pairs), eval=str(pairs))
    config = train_reward_model.Config(batch_size=2, epochs=100, learning_rate=1e-4)  # 200 steps
    context = _context(mlflow_outage.url, str(tmp_path / "runs"), window_s=3)
    watcher = threading.Thread(
        target=_take_down_once_training_logs, args=(mlflow_outage, mlflow_server, context.parent_run_id, 5)
    )
    watcher.start()
    with pytest.raises(UserError) as raised:
        train_reward_model.run(config, inputs, context)
    watcher.join()
    message = str(raised.value)
    checkpoint_uri = str(tmp_path / "runs" / context.parent_run_id / "train_reward_model" / "checkpoint")
    assert "\n" not in message
    assert message.startswith(
        f"train_reward_model: MLflow tracking server {mlflow_outage.url} did not answer for 3 s (Connection "
        "refused); tracking.retry_window_s sets how long to wait; the progress after step "
    )
    assert message.endswith(f"/200 is saved in {checkpoint_uri}, and a retry of this run resumes from it")
    saved_step = int(message.split("the progress after step ")[1].split("/")[0])
    assert saved_step >= 5
    assert checkpoint.load(checkpoint_uri)[1]["step"] == saved_step

    mlflow_outage.up()  # the server is back: KFP's retry of the task runs the step again
    with caplog.at_level(logging.INFO):
        outputs = train_reward_model.run(config, inputs, context)
    assert f"resumed from {checkpoint_uri} after step {saved_step}" in caplog.text
    assert Path(outputs.reward_model, "config.json").is_file()
