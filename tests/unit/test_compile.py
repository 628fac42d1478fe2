"""`rlhf compile`: the KFP IR YAML of the RLHF DAG (DESIGN §3), checked from the file the CLI writes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import components

from rlhf_pipelines import cli as cli_module
from rlhf_pipelines.components import IMAGE

from .test_config import demo_mapping

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


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path


def run_cli(args: list[str], cwd: Path) -> CliResult:
    """`rlhf <args>` through the console script's entry point `rlhf_pipelines.cli:main`, in this process.

    In-process because a fresh `rlhf` process spends seconds importing torch; test_config.py covers the
    installed console script as a real subprocess. Logging set-up is skipped so this process's logging is
    left alone.
    """
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["rlhf", *args])
        patch.setattr(cli_module, "setup_logging", lambda: None)
        try:
            cli_module.main()
        except SystemExit as done:
            returncode = done.code if isinstance(done.code, int) else 1
    return CliResult(returncode, out.getvalue(), err.getvalue(), cwd)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliResult]:
    """`rlhf compile` of the rlhf, dpo and grpo DAGs and of an unknown pipeline, each in its own directory."""
    return {
        "rlhf": run_cli(
            ["compile", "--pipeline", "rlhf", "-o", "out/rlhf.yaml"], tmp_path_factory.mktemp("compile-rlhf")
        ),
        "dpo": run_cli(
            ["compile", "--pipeline", "dpo", "-o", "dpo.yaml"], tmp_path_factory.mktemp("compile-dpo")
        ),
        "grpo": run_cli(
            ["compile", "--pipeline", "grpo", "-o", "grpo.yaml"], tmp_path_factory.mktemp("compile-grpo")
        ),
        "grpo-feedback": run_cli(
            ["compile", "--pipeline", "grpo-feedback", "-o", "grpo-feedback.yaml"],
            tmp_path_factory.mktemp("compile-grpo-feedback"),
        ),
        "unknown": run_cli(
            ["compile", "--pipeline", "no-such-dag", "-o", "unknown.yaml"],
            tmp_path_factory.mktemp("compile-unknown"),
        ),
    }


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


def test_compiled_file_names_every_step_task(spec: dict[str, Any]) -> None:
    tasks = _tasks(spec)
    assert set(tasks) == TASKS
    assert spec["pipelineInfo"]["name"] == "rlhf"


def test_the_kfp_ui_shows_readable_names_and_never_serves_a_task_from_cache(spec: dict[str, Any]) -> None:
    tasks = _tasks(spec)
    shown = {name: task["taskInfo"]["name"] for name, task in tasks.items()}
    assert shown["generate-candidates"] == "generate candidates (champion)"
    assert shown["register-and-promote"] == "register, gate, promote"
    assert len(set(shown.values())) == len(TASKS) and not set(shown.values()) & TASKS - {"ppo"}
    # A recurring run uploaded through the UI with an unchanged config must still read new feedback.
    assert all(task["cachingOptions"] == {} for task in tasks.values())  # enableCache absent: off


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
    output = spec["root"]["dag"]["outputs"]["parameters"]["Output"]["valueFromParameter"]
    assert output["producerSubtask"] == "register-and-promote"


def test_start_register_and_the_trainers_are_retried(spec: dict[str, Any]) -> None:
    tasks = _tasks(spec)
    for name in ("start-run", "train-reward-model", "ppo", "register-and-promote"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2, name
    assert "retryPolicy" not in tasks["evaluate"]


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
    assert lines == ["error: unknown pipeline 'no-such-dag'; available: dpo, grpo, grpo-feedback, rlhf"]
    assert not (result.cwd / "unknown.yaml").exists()


def test_the_dpo_dag_trains_from_the_feedback_without_a_reward_model(cli: dict[str, CliResult]) -> None:
    result = cli["dpo"]
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all((result.cwd / "dpo.yaml").read_text(encoding="utf-8")) if doc]
    spec = docs[0]
    assert spec["pipelineInfo"]["name"] == "dpo"
    depends = {name: set(task.get("dependentTasks", [])) for name, task in _tasks(spec).items()}
    assert set(depends) == {
        "start-run",
        "collect-prompts",
        "generate-candidates",
        "ingest-feedback",
        "dpo",
        "evaluate",
        "register-and-promote",
    }
    assert "ingest-feedback" in depends["dpo"]
    assert {"dpo", "collect-prompts"} <= depends["evaluate"]
    assert {"evaluate", "dpo", "ingest-feedback"} <= depends["register-and-promote"]
    reward = _tasks(spec)["evaluate"]["inputs"]["parameters"]["reward"]
    assert reward["runtimeValue"]["constant"] == "null"
    assert _tasks(spec)["dpo"]["retryPolicy"]["maxRetryCount"] == 2


def test_the_grpo_dag_trains_on_the_prompts_alone(cli: dict[str, CliResult]) -> None:
    result = cli["grpo"]
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all((result.cwd / "grpo.yaml").read_text(encoding="utf-8")) if doc]
    spec = docs[0]
    assert spec["pipelineInfo"]["name"] == "grpo"
    depends = {name: set(task.get("dependentTasks", [])) for name, task in _tasks(spec).items()}
    assert depends == {
        "start-run": set(),
        "collect-prompts": {"start-run"},
        "grpo": {"start-run", "collect-prompts"},
        "evaluate": {"start-run", "collect-prompts", "grpo"},
        "register-and-promote": {"start-run", "collect-prompts", "grpo", "evaluate"},
    }
    register = _tasks(spec)["register-and-promote"]["inputs"]["parameters"]
    assert register["feedback"]["runtimeValue"]["constant"] == "null"
    assert register["reward"]["runtimeValue"]["constant"] == "null"
    assert _tasks(spec)["grpo"]["inputs"]["parameters"]["reward"]["runtimeValue"]["constant"] == "null"
    assert _tasks(spec)["grpo"]["retryPolicy"]["maxRetryCount"] == 2


def test_the_grpo_feedback_dag_trains_a_reward_model_for_grpo(cli: dict[str, CliResult]) -> None:
    result = cli["grpo-feedback"]
    assert result.returncode == 0, result.stderr
    docs = yaml.safe_load_all((result.cwd / "grpo-feedback.yaml").read_text(encoding="utf-8"))
    spec = next(doc for doc in docs if doc)
    depends = {name: set(task.get("dependentTasks", [])) for name, task in _tasks(spec).items()}
    assert depends["train-reward-model"] == {"start-run", "ingest-feedback"}
    assert depends["grpo"] == {"start-run", "collect-prompts", "train-reward-model"}
    assert {"grpo", "train-reward-model", "ingest-feedback"} <= depends["register-and-promote"]


MODEL_EXECUTORS = {"exec-generate-candidates", "exec-train-reward-model", "exec-ppo", "exec-evaluate"}


def test_model_steps_request_the_gpus_given_at_compile_time(tmp_path: Path) -> None:
    """RLHF_TASK_GPUS is read when the DAG is built, so this compiles in a fresh process."""
    rlhf = Path(sys.executable).parent / "rlhf"
    environment = {**os.environ, "RLHF_TASK_GPUS": "2"}
    done = subprocess.run(
        [str(rlhf), "compile", "-o", "gpu.yaml"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    compiled = next(yaml.safe_load_all((tmp_path / "gpu.yaml").read_text(encoding="utf-8")))
    executors = compiled["deploymentSpec"]["executors"]
    requested = {
        name: executor["container"]["resources"]["accelerator"]
        for name, executor in executors.items()
        if "resources" in executor["container"]
    }
    assert set(requested) == MODEL_EXECUTORS
    for accelerator in requested.values():
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    bad = subprocess.run(
        [str(rlhf), "compile", "-o", "bad.yaml"],
        cwd=tmp_path,
        env={**environment, "RLHF_TASK_GPUS": "two"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: RLHF_TASK_GPUS: 'two' is not a whole number of GPUs"


def test_without_rlhf_task_gpus_no_pod_requests_a_gpu(spec: dict[str, Any]) -> None:
    assert all("resources" not in e["container"] for e in spec["deploymentSpec"]["executors"].values())


def test_the_configs_resources_size_each_tasks_pod(tmp_path: Path) -> None:
    config = {
        **demo_mapping(),
        "resources": {
            "ppo": {"cpu_request": "4", "cpu_limit": "8", "memory_request": "16Gi", "memory_limit": "24Gi"},
            "collect_prompts": {"memory_limit": "2Gi"},
        },
    }
    (tmp_path / "sized.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = run_cli(["compile", "--config", "sized.yaml", "-o", "sized-ir.yaml"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "compiled rlhf to" in done.stdout  # the config's DAG
    compiled = next(yaml.safe_load_all((tmp_path / "sized-ir.yaml").read_text(encoding="utf-8")))
    sized = {
        name: executor["container"].get("resources", {})
        for name, executor in compiled["deploymentSpec"]["executors"].items()
    }
    assert sized["exec-ppo"]["resourceCpuRequest"] == "4" and sized["exec-ppo"]["resourceCpuLimit"] == "8"
    assert sized["exec-ppo"]["resourceMemoryRequest"] == "16Gi"
    assert sized["exec-ppo"]["resourceMemoryLimit"] == "24Gi"
    assert sized["exec-collect-prompts"] == {"resourceMemoryLimit": "2Gi", "memoryLimit": 2.147483648}
    assert all(not sized[name] for name in sized if name not in ("exec-ppo", "exec-collect-prompts"))


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"ppo": {"memory_limit": "16GB"}}, "resources.ppo.memory_limit"),
        ({"trainer": {"cpu_limit": "2"}}, "resources.trainer"),
    ],
)
def test_a_bad_resources_entry_is_one_line_naming_the_field(
    tmp_path: Path, resources: dict[str, Any], field: str
) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**demo_mapping(), "resources": resources}))
    done = run_cli(["compile", "--config", "bad.yaml", "-o", "ir.yaml"], tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "bad.yaml" in line and field in line, line
    assert not (tmp_path / "ir.yaml").exists()


def test_each_task_leaves_typed_artifacts_for_the_kfp_ui(spec: dict[str, Any]) -> None:
    leaves = {
        name: {
            output: definition["artifactType"]["schemaTitle"]
            for output, definition in spec["components"][task["componentRef"]["name"]]
            .get("outputDefinitions", {})
            .get("artifacts", {})
            .items()
        }
        for name, task in _tasks(spec).items()
    }
    assert leaves == {
        "start-run": {},
        "collect-prompts": {"prompt_dataset": "system.Dataset"},
        "generate-candidates": {},
        "ingest-feedback": {"preference_dataset": "system.Dataset"},
        "train-reward-model": {"reward_model": "system.Model"},
        "ppo": {"policy": "system.Model"},
        "evaluate": {"metrics": "system.Metrics", "report": "system.HTML"},
        "register-and-promote": {
            "decision": "system.Markdown",
            "registered_policy": "system.Model",
            "registered_reward_model": "system.Model",
        },
    }
