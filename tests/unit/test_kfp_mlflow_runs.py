"""KFP's MLflow integration (KFP 2.17, KEP-12862) makes an MLflow run for each pipeline run and one nested in
it for each task, and hands each task's container its run as MLFLOW_RUN_ID, with MLFLOW_TRACKING_URI. Our
steps then record in those runs and make none of their own. No KFP backend runs here: the test makes the
runs as KFP's driver does, on a sqlite store, and sets the variables as the driver would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest

from rlhf_components.core.config import StrictModel
from rlhf_components.core.tracking import step_run
from rlhf_pipelines import steps

from .test_steps import pipeline_config

TASKS = ("start-run", "collect-prompts")


class StepSettings(StrictModel):
    batch_size: int = 8


def kfp_made_runs(uri: str) -> tuple[str, dict[str, str]]:
    """(the pipeline's run, {task: its nested run}), as KFP's API server and driver make them."""
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("kfp-experiment")
    root = client.create_run(experiment, run_name="rlhf-2026-12-03", tags={"kfp.pipeline_run_id": "abc"})
    nested = {
        task: client.create_run(
            experiment, run_name=task, tags={"mlflow.parentRunId": root.info.run_id}
        ).info.run_id
        for task in TASKS
    }
    return root.info.run_id, nested


def all_runs(uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return list(client.search_runs(experiments))


def started_by_kfp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, dict[str, str], Any]:
    """(tracking URI, KFP's pipeline run, its task runs, the run context start_run made in its task run)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root, nested = kfp_made_runs(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", nested["start-run"])
    context = steps.Started.model_validate_json(steps.start(pipeline_config(tmp_path))).context
    return uri, root, nested, context


def test_start_and_the_steps_record_in_the_runs_kfp_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, root, nested, context = started_by_kfp(tmp_path, monkeypatch)
    assert context.parent_run_id == root
    pipeline_run = mlflow.MlflowClient(uri).get_run(root)
    assert (
        pipeline_run.data.tags["rlhf.kind"] == "pipeline"
        and pipeline_run.data.tags["rlhf.pipeline"] == "demo"
    )
    assert pipeline_run.data.tags["kfp.pipeline_run_id"] == "abc"  # KFP's own tags stay
    assert pipeline_run.data.params["seed"] == "0"

    monkeypatch.setenv("MLFLOW_RUN_ID", nested["collect-prompts"])
    with step_run(context, "collect_prompts", StepSettings()) as run:
        assert run.info.run_id == nested["collect-prompts"]
        mlflow.log_metric("kept", 42)
    task_run = mlflow.MlflowClient(uri).get_run(nested["collect-prompts"])
    assert task_run.data.tags["rlhf.step"] == "collect_prompts"
    assert task_run.data.params == {"batch_size": "8"} and task_run.data.metrics == {"kept": 42.0}
    assert task_run.info.status == "FINISHED"
    assert len(all_runs(uri)) == 1 + len(TASKS), "no run besides KFP's"


def test_a_failing_step_marks_the_run_kfp_made_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _, nested, context = started_by_kfp(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_RUN_ID", nested["collect-prompts"])
    with (
        pytest.raises(RuntimeError, match="no prompts"),
        step_run(context, "collect_prompts", StepSettings()),
    ):
        raise RuntimeError("no prompts")
    assert mlflow.MlflowClient(uri).get_run(nested["collect-prompts"]).info.status == "FAILED"


def test_a_run_id_that_is_not_this_pipelines_task_run_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An MLFLOW_RUN_ID left in a user's shell, or naming a run on another server, is not adopted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    outsider = client.create_run(client.create_experiment("notebook")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)  # on no server of ours
    context = steps.Started.model_validate_json(steps.start(pipeline_config(tmp_path))).context
    assert "is not a run of" in caplog.text
    assert context.parent_run_id != outsider
    assert client.get_run(context.parent_run_id).data.tags["rlhf.kind"] == "pipeline"

    monkeypatch.setenv("MLFLOW_RUN_ID", outsider)  # not nested in the pipeline's run
    with step_run(context, "collect_prompts", StepSettings()) as run:
        assert run.info.run_id != outsider
    own = client.get_run(run.info.run_id)
    assert own.data.tags["mlflow.parentRunId"] == context.parent_run_id
    assert own.data.tags["rlhf.step"] == "collect_prompts" and own.info.run_name == "collect_prompts"
    assert "mlflow.user" in own.data.tags  # the context tags MLflow gives a run it starts itself
    assert client.get_run(outsider).data.params == {}
