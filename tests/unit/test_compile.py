"""`rlhf compile`: the KFP IR YAML of the RLHF DAG (DESIGN §3), checked from the file the CLI writes.

Both CLI calls run as subprocesses of the installed console script, started together once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import components

from rlhf_pipelines.components import IMAGE

RLHF = Path(sys.executable).parent / "rlhf"
CLI_TIMEOUT_S = 180
TASKS = {
    "start-run", "collect-prompts", "generate-candidates", "ingest-feedback",
    "train-reward-model", "ppo", "evaluate", "register-and-promote",
}


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, CliResult]]:
    """`rlhf compile` of the rlhf DAG and of an unknown pipeline, each in its own cwd, run concurrently."""
    cases = {
        "rlhf": ["compile", "--pipeline", "rlhf", "-o", "out/rlhf.yaml"],
        "unknown": ["compile", "--pipeline", "no-such-dag", "-o", "unknown.yaml"],
    }
    env = dict(os.environ)  # inherits RLHF_IMAGE, if set, so the subprocess compiles with this process's IMAGE
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for name, args in cases.items():
            cwd = tmp_path_factory.mktemp(f"compile-{name}")
            with (cwd / "cli.stdout").open("wb") as out, (cwd / "cli.stderr").open("wb") as err:
                running[name] = (subprocess.Popen([str(RLHF), *args], cwd=cwd, env=env, stdout=out, stderr=err), cwd)
        results = {}
        for name, (process, cwd) in running.items():
            returncode = process.wait(timeout=CLI_TIMEOUT_S)
            results[name] = CliResult(returncode, (cwd / "cli.stdout").read_text(encoding="utf-8"),
                                      (cwd / "cli.stderr").read_text(encoding="utf-8"), cwd)
        yield results
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def compiled_path(cli: dict[str, CliResult]) -> Path:
    result = cli["rlhf"]
    assert result.returncode == 0, result.stderr
    path = result.cwd / "out" / "rlhf.yaml"
    assert path.is_file(), f"compile did not write {path}: {result.stdout}"
    return path


@pytest.fixture(scope="module")
def spec(compiled_path: Path) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all(compiled_path.read_text(encoding="utf-8")) if doc]
    assert docs, "empty IR file"
    first: dict[str, Any] = docs[0]
    return first


def _tasks(spec: dict[str, Any]) -> dict[str, Any]:
    tasks: dict[str, Any] = spec["root"]["dag"]["tasks"]
    return tasks


def test_compile_reports_the_output_path(cli: dict[str, CliResult], compiled_path: Path) -> None:
    assert "compiled rlhf to" in cli["rlhf"].stdout
    assert "Traceback" not in cli["rlhf"].stderr


def test_compiled_file_names_every_step_task(compiled_path: Path, spec: dict[str, Any]) -> None:
    text = compiled_path.read_text(encoding="utf-8")
    for task in TASKS:
        assert f"name: {task}\n" in text, task
    tasks = _tasks(spec)
    assert set(tasks) == TASKS
    assert {task["taskInfo"]["name"] for task in tasks.values()} == TASKS
    assert spec["pipelineInfo"]["name"] == "rlhf"


def test_every_component_runs_in_the_project_image(spec: dict[str, Any]) -> None:
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(TASKS)
    images = {name: executor["container"]["image"] for name, executor in executors.items()}
    assert set(images.values()) == {IMAGE}, images
    # Every task's component resolves to one of those executors.
    for name, task in _tasks(spec).items():
        component = spec["components"][task["componentRef"]["name"]]
        assert component["executorLabel"] in executors, name


def test_pipeline_input_is_the_config_string(spec: dict[str, Any]) -> None:
    assert spec["root"]["inputDefinitions"]["parameters"] == {"config": {"parameterType": "STRING"}}
    # Every step receives the whole run config.
    for name, task in _tasks(spec).items():
        assert task["inputs"]["parameters"]["config"] == {"componentInputParameter": "config"}, name


def test_dag_edges_follow_the_design(spec: dict[str, Any]) -> None:
    depends = {name: set(task.get("dependentTasks", [])) for name, task in _tasks(spec).items()}
    assert depends["start-run"] == set()
    assert "start-run" in depends["collect-prompts"]
    assert "collect-prompts" in depends["generate-candidates"]
    assert "generate-candidates" in depends["ingest-feedback"]
    assert "ingest-feedback" in depends["train-reward-model"]
    assert {"train-reward-model", "collect-prompts"} <= depends["ppo"]
    assert {"ppo", "train-reward-model", "collect-prompts"} <= depends["evaluate"]
    assert {"evaluate", "ppo", "train-reward-model"} <= depends["register-and-promote"]
    assert spec["root"]["dag"]["outputs"]["parameters"]["Output"]["valueFromParameter"]["producerSubtask"] == (
        "register-and-promote"
    )


def test_start_and_register_steps_are_retried(spec: dict[str, Any]) -> None:
    tasks = _tasks(spec)
    for name in ("start-run", "register-and-promote"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2, name
    assert "retryPolicy" not in tasks["ppo"]


def test_compiled_pipeline_reloads_as_a_component(compiled_path: Path) -> None:
    component = components.load_component_from_file(str(compiled_path))
    assert component.name == "rlhf"
    inputs = component.component_spec.inputs
    assert inputs is not None and set(inputs) == {"config"}
    assert inputs["config"].type == "String"
    assert not inputs["config"].optional
    outputs = component.component_spec.outputs
    assert outputs is not None and outputs["Output"].type == "String"
    assert component.pipeline_spec is not None
    assert set(component.pipeline_spec.root.dag.tasks) == TASKS


def test_compile_unknown_pipeline_is_a_one_line_error(cli: dict[str, CliResult]) -> None:
    result = cli["unknown"]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown pipeline 'no-such-dag'; available: rlhf"]
    assert not (result.cwd / "unknown.yaml").exists()
