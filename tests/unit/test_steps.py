"""pipelines/steps.py, the task bodies: start builds the run context once; every later task parses its
upstream outputs with the producing step's Outputs model before anything runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
from pydantic import ValidationError

from rlhf_components.core.step import ERROR_FILE_ENV
from rlhf_components.core.tracking import code_version
from rlhf_pipelines import steps

from .test_config import demo_mapping


def pipeline_config(root: Path) -> str:
    data = demo_mapping()
    data.pop("demo_assets")
    data.update(
        policy=str(root / "sft"),
        storage_root=str(root / "outputs"),
        feedback_inbox=str(root / "inbox"),
        tracking={"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "steps"},
    )
    return json.dumps(data)


def test_start_builds_the_run_context_every_task_receives(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path)
    started = steps.Started.model_validate_json(steps.start(config))
    context = started.context
    assert context.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (context.experiment, context.output_root, context.seed) == ("steps", str(tmp_path / "outputs"), 0)
    parent = mlflow.MlflowClient(context.tracking_uri).get_run(context.parent_run_id)
    assert parent.info.status == "RUNNING" and parent.data.tags["rlhf.pipeline"] == "demo"
    assert parent.data.tags["rlhf.git_sha"] == code_version() != "unknown"  # tests run from the checkout
    # Nothing promoted yet: the run starts from the SFT policy.
    assert (started.champion, started.champion_version) == (str(tmp_path / "sft"), None)


def test_an_upstream_output_that_is_not_its_steps_outputs_fails_the_task_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pipeline_config(tmp_path)
    started = steps.start(config)
    error_file = tmp_path / "error.txt"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))
    candidates = {"candidates": "c.jsonl", "tasks": "t.jsonl", "num_candidates": 4}  # fields are missing
    with pytest.raises(ValidationError, match="label_studio_tasks"):
        steps.run_ingest_feedback(config, started, json.dumps(candidates))
    assert error_file.read_text().startswith("step ingest_feedback: ")
    context = steps.Started.model_validate_json(started).context
    parent = mlflow.MlflowClient(context.tracking_uri).get_run(context.parent_run_id)
    assert parent.info.status == "FAILED"
    # Whoever opens the failed run sees where and why, as `rlhf run` printed it.
    assert parent.data.tags["rlhf.failed_step"] == "ingest_feedback"
    assert "label_studio_tasks" in parent.data.tags["rlhf.failure"]
    assert error_file.read_text() == f"step ingest_feedback: {parent.data.tags['rlhf.failure']}\n"
    assert not (tmp_path / "outputs").exists(), "the step never ran"


def test_the_code_version_is_the_images_build_else_the_checkouts_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RLHF_GIT_SHA", raising=False)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    ).stdout
    assert re.fullmatch(rf"{head.strip()}(-dirty)?", code_version())
    assert code_version(tmp_path / "not-a-checkout.py") == "unknown"
    monkeypatch.setenv("RLHF_GIT_SHA", "0123abc")  # what `make images` bakes into the image
    assert code_version() == code_version(tmp_path / "not-a-checkout.py") == "0123abc"
