"""pipelines/steps.py, the task bodies: start builds the run context once; every later task parses its
upstream outputs with the producing step's Outputs model before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from pydantic import ValidationError

from rlhf_components.core.step import ERROR_FILE_ENV
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
    assert mlflow.MlflowClient(context.tracking_uri).get_run(context.parent_run_id).info.status == "FAILED"
    assert not (tmp_path / "outputs").exists(), "the step never ran"
