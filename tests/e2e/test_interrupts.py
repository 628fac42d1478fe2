"""Stopping `rlhf run` while the reward model trains on two torchrun workers: Ctrl-C (SIGINT to the whole
process group, as a terminal sends it), SIGTERM to `rlhf run` alone, and SIGKILL to `rlhf run` alone. Each
leaves no process of the run behind; the first two end in exit code 130 and one line, with the pipeline's
MLflow runs marked KILLED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from rlhf_components.demo import DemoAssets

from .test_pipeline_local import tiny_pipeline_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAINING_WORKER = "rlhf_components.train_reward_model"


def _start(assets: DemoAssets, root: Path) -> subprocess.Popen[str]:
    config = tiny_pipeline_config(assets, root)
    config["train_reward_model"] = {**config["train_reward_model"], "epochs": 500}  # type: ignore[dict-item]
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    rlhf = Path(sys.executable).parent / "rlhf"
    return subprocess.Popen(
        [str(rlhf), "run", str(config_path), "--workdir", str(root)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a command typed into a terminal
    )


def _training_processes(runner: subprocess.Popen[str], timeout_s: float = 300) -> list[psutil.Process]:
    """Every process below `rlhf run` once both torchrun workers of the reward model step are running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert runner.poll() is None, runner.stderr.read() if runner.stderr else ""
        below = psutil.Process(runner.pid).children(recursive=True)
        commands = [" ".join(_cmdline(p)) for p in below]
        workers = [c for c in commands if TRAINING_WORKER in c and "torch.distributed.run" not in c]
        if len(workers) == 2:
            return below
        time.sleep(0.5)
    raise AssertionError("the reward model's torchrun workers never started")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _left_running(processes: list[psutil.Process], within_s: float) -> list[str]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.5)
    return [" ".join(_cmdline(p))[:120] for p in alive]


def _statuses(root: Path) -> tuple[str, set[str]]:
    """(the pipeline run's status, the statuses of its step runs)."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.`rlhf.kind` = 'pipeline'")
    steps = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return parent.info.status, {run.info.status for run in steps}


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_stops_everything_and_says_so_in_one_line(
    tiny_assets: DemoAssets, tmp_path: Path, how: str
) -> None:
    runner = _start(tiny_assets, tmp_path)
    started = _training_processes(runner)
    if how == "ctrl-c":
        os.killpg(runner.pid, signal.SIGINT)
    else:
        runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=60)
    assert runner.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: pipeline tiny stopped"), last
    assert _left_running(started, within_s=10) == []
    parent, steps = _statuses(tmp_path)
    assert parent == "KILLED" and "RUNNING" not in steps, (parent, steps)
    assert "MLflow run" in last and "KILLED" in last


def test_a_killed_run_leaves_no_training_behind(tiny_assets: DemoAssets, tmp_path: Path) -> None:
    runner = _start(tiny_assets, tmp_path)
    started = _training_processes(runner)
    runner.kill()
    runner.wait(timeout=10)
    assert _left_running(started, within_s=30) == []
    parent, _ = _statuses(tmp_path)
    assert parent == "KILLED"  # the step saw its `rlhf run` vanish and recorded it
