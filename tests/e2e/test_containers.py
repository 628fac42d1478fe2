"""The component image, built here with podman from containers/Dockerfile, and the DAG run inside it:
`rlhf run --runner docker` through kfp.local's DockerRunner on podman's Docker-compatible socket.

In CI (.ci/run sets RLHF_REQUIRE_CONTAINERS=1) these tests must run; elsewhere, without a working podman,
they skip with one line saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytest
import yaml

from rlhf_components.demo import DemoAssets

from .test_interrupts import TRAINING_WORKER, _left_running, _statuses
from .test_pipeline_local import failing_feedback_config, tiny_pipeline_config

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
TEST_IMAGE = "localhost/rlhf-pipelines:test"
BASE_IMAGE = "localhost/rlhf-base:bookworm"
IMAGE_SIZE_TARGET = 1.6e9
BUILT_FROM: list[str] = []  # `git describe` of the tree the test image was built from


def _unavailable(reason: str) -> None:
    if os.environ.get("RLHF_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"container tests must run here (RLHF_REQUIRE_CONTAINERS=1), but {reason}")
    pytest.skip(f"CONTAINER TESTS NOT RUN: {reason} (install podman as .ci/run does)")


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _containers(*flags: str) -> list[str]:
    """The ids of the test image's containers (running ones; all with --all)."""
    return _podman("ps", "--quiet", *flags, "--filter", f"ancestor={TEST_IMAGE}").stdout.split()


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker-compatible API on a socket of the test session's own."""
    if shutil.which("podman") is None:
        _unavailable("podman is not installed")
    info = _podman("info")
    if info.returncode != 0:
        _unavailable(f"`podman info` fails: {info.stderr.strip().splitlines()[-1:]}")
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert service.poll() is None and time.monotonic() < deadline, "podman system service did not start"
        time.sleep(0.2)
    yield f"unix://{socket}"
    service.terminate()
    service.wait(timeout=30)


@pytest.fixture(scope="session")
def project_image(podman_socket: str) -> str:
    """`make images` from this working tree (layers cached between runs), on the registry-free base image."""
    if _podman("image", "exists", BASE_IMAGE).returncode != 0:
        if shutil.which("debootstrap") is None:
            _unavailable(f"there is no base image {BASE_IMAGE} and no debootstrap to make it")
        made = subprocess.run(["make", "base-image"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    described = ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=40"]
    BUILT_FROM.append(subprocess.run(described, capture_output=True, text=True, check=True).stdout.strip())
    built = subprocess.run(
        ["make", "images", f"RLHF_IMAGE={TEST_IMAGE}"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert re.search(rf"{re.escape(TEST_IMAGE)}: \d+\.\d\d GB", built.stdout), built.stdout[-500:]
    return TEST_IMAGE


def test_the_image_is_small_and_runs_the_cli_and_a_step_as_any_user(
    project_image: str, tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", project_image).stdout)
    assert size < IMAGE_SIZE_TARGET, f"{size / 1e9:.2f} GB"
    assert _podman("run", "--rm", project_image, "pip", "--version").returncode != 0  # no pip in the image

    baked = _podman("run", "--rm", project_image, "printenv", "RLHF_GIT_SHA").stdout.strip()
    assert baked == BUILT_FROM[-1]  # what rlhf.git_sha records for runs in the image

    shown = _podman("run", "--rm", project_image)  # the default command: `rlhf --help`
    assert shown.returncode == 0 and "Usage: rlhf" in shown.stdout and "run" in shown.stdout, shown.stderr

    # collect_prompts alone, as a uid the image does not know, in a folder only that uid may write.
    work = tmp_path / "work"
    work.mkdir()
    tracking = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "in-a-container"}
    job = {
        "context": {"tracking": tracking, "output_root": str(work / "out")},
        "inputs": {},
        "config": {"sources": [tiny_assets.prompts_file], "eval_fraction": 0.2},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    os.chown(work, 4321, 4321)
    os.chmod(work, 0o700)
    assets = Path(tiny_assets.prompts_file).parent
    done = _podman(
        "run", "--rm", "--user", "4321:4321", "--workdir", str(work),
        "--volume", f"{work}:{work}", "--volume", f"{assets}:{assets}:ro", project_image,
        "python", "-m", "rlhf_components.collect_prompts", "--config", str(work / "job.yaml"),
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = json.loads(done.stdout)
    manifest = Path(outputs["manifest"])
    assert manifest.is_file() and manifest.stat().st_uid == 4321
    assert outputs["counts"]["kept"] == outputs["counts"]["train"] + outputs["counts"]["eval"] > 0
    client = mlflow.MlflowClient(tracking["uri"])
    experiment = client.get_experiment_by_name("in-a-container")
    [run] = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`rlhf.standalone_step` = 'collect_prompts'"
    )
    assert run.info.status == "FINISHED"


def _rlhf_run(config: dict[str, Any], root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    rlhf = Path(sys.executable).parent / "rlhf"
    return subprocess.run(
        [str(rlhf), "run", str(config_path), "--workdir", str(root), *options],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        env=_docker_environment(),
    )


def _docker_environment() -> dict[str, str]:
    return {**os.environ, "DOCKER_HOST": os.environ["RLHF_TEST_DOCKER_HOST"], "RLHF_IMAGE": TEST_IMAGE}


@pytest.fixture
def docker_host(podman_socket: str, project_image: str) -> Iterator[None]:
    os.environ["RLHF_TEST_DOCKER_HOST"] = podman_socket
    yield
    os.environ.pop("RLHF_TEST_DOCKER_HOST")
    assert _containers("--all") == [], "containers left behind"


def _registry_state(root: Path, run_id: str) -> dict[str, Any]:
    """Every registered model's versions, aliases and tags, less what names this run or its time."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    state: dict[str, Any] = {}
    for model in client.search_registered_models():
        versions = {}
        for version in client.search_model_versions(f"name = '{model.name}'"):
            assert version.tags["rlhf.pipeline_run_id"] == run_id
            tags = {
                key: re.sub(r"^\d{4}-\d\d-\d\dT[\d:+]+ ", "", value)
                for key, value in version.tags.items()
                if key not in ("rlhf.pipeline_run_id", "rlhf.config_hash", "rlhf.git_sha")
            }
            versions[version.version] = (version.status, tags)
        state[model.name] = {"aliases": dict(model.aliases), "versions": versions}
    return state


def test_the_demo_dag_in_containers_registers_what_the_subprocess_runner_does(
    docker_host: None, tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    in_containers, in_processes = tmp_path / "docker", tmp_path / "subprocess"
    summaries = {}
    for root, options in ((in_containers, ["--runner", "docker"]), (in_processes, [])):
        root.mkdir()
        done = _rlhf_run(tiny_pipeline_config(tiny_assets, root), root, *options)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summaries[root] = json.loads((root / "summary.json").read_text())

    assert "Executing task" in done.stdout + done.stderr
    docker, subprocess_ = (summaries[root] for root in (in_containers, in_processes))
    assert docker["registered"]["policy"]["aliases"] == ["production", "staging"]
    assert _registry_state(in_containers, docker["pipeline_run_id"]) == _registry_state(
        in_processes, subprocess_["pipeline_run_id"]
    )
    unnamed = [{k: v for k, v in s.items() if k != "pipeline_run_id"} for s in summaries.values()]
    assert unnamed[0] == unnamed[1]
    # Code versions differ only if the tree changed after the image was built: each records its own.
    registered = mlflow.MlflowClient(f"sqlite:///{in_containers / 'mlflow.db'}").get_model_version(
        "tiny-policy", "1"
    )
    assert registered.tags["rlhf.git_sha"] == BUILT_FROM[-1]
    # The steps wrote the host's folders, as the host user.
    policy = next((in_containers / "outputs").glob("*/ppo/policy/model.safetensors"))
    assert policy.stat().st_uid == os.getuid()
    assert next((in_containers / "inbox" / "labels").glob("simulated-*.jsonl")).is_file()


def test_a_step_failing_in_its_container_fails_the_run_with_its_error_line(
    docker_host: None, tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    """Against unpatched kfp 2.17 under podman the failed task is reported SUCCESS."""
    done = _rlhf_run(failing_feedback_config(tiny_assets, tmp_path), tmp_path, "--runner", "docker")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pipeline tiny failed at step ingest_feedback:"), last
    assert "bad.jsonl" in last and "invalid" in last
    plain = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    assert "Task 'ingest-feedback' finished with status FAILURE" in plain
    assert "Task 'train-reward-model'" not in plain
    assert _statuses(tmp_path)[0] == "FAILED"


def test_a_missing_image_is_one_line_before_anything_runs(
    docker_host: None, tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    env = {**_docker_environment(), "RLHF_IMAGE": "localhost/rlhf-pipelines:never-built"}
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_pipeline_config(tiny_assets, tmp_path)), encoding="utf-8")
    rlhf = Path(sys.executable).parent / "rlhf"
    done = subprocess.run(
        [str(rlhf), "run", str(config_path), "--runner", "docker"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --runner docker: image localhost/rlhf-pipelines:never-built is not there; build it with "
        "`make images` or name another with RLHF_IMAGE"
    ]
    assert not (tmp_path / "mlflow.db").exists()


def _workers_in_containers(runner: subprocess.Popen[str], timeout_s: float = 300) -> list[psutil.Process]:
    """The reward model step's two torchrun workers, running in its container (host pids: it shares them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert runner.poll() is None, runner.stderr.read() if runner.stderr else ""
        workers = []
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if TRAINING_WORKER in command and "torch.distributed.run" not in command:
                workers.append(process)
        if len(workers) == 2:
            return workers
        time.sleep(0.5)
    raise AssertionError("the reward model's torchrun workers never started")


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_stopping_a_container_run_stops_its_containers(
    docker_host: None, tiny_assets: DemoAssets, tmp_path: Path, how: str
) -> None:
    config = tiny_pipeline_config(tiny_assets, tmp_path)
    config["train_reward_model"] = {**config["train_reward_model"], "epochs": 500}  # type: ignore[dict-item]
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    runner = subprocess.Popen(
        [str(Path(sys.executable).parent / "rlhf"), "run", str(config_path), "--runner", "docker"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=_docker_environment(),
    )  # fmt: skip
    workers = _workers_in_containers(runner)
    try:
        if how == "ctrl-c":
            os.killpg(runner.pid, signal.SIGINT)
            _, stderr = runner.communicate(timeout=60)
            assert runner.returncode == 130, stderr[-3000:]
            assert stderr.strip().splitlines()[-1].startswith("interrupted: pipeline tiny stopped")
        else:
            runner.kill()  # nothing runs in `rlhf run` any more: the step must notice by itself
            runner.wait(timeout=10)
        assert _left_running(workers, within_s=30) == []
        deadline = time.monotonic() + 30
        while _containers():
            assert time.monotonic() < deadline, "a container still runs"
            time.sleep(0.5)
        assert _statuses(tmp_path)[0] == "KILLED"
    finally:
        if how == "sigkill":  # nobody was left to remove the stopped container
            for container in _containers("--all"):
                _podman("rm", "--force", container)
