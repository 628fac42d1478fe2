"""Trainer checkpoint/resume (PPO, the reward model): a run killed with SIGKILL, then resumed, ends with the
weights of an unbroken run.

Both runs are real `python -m rlhf_components.<step>` processes on the CPU, one thread each: the two run side
by side, and a BLAS that adapts its thread count to the load would change float rounding between them. Bit
equality then holds even for attention's key bias, whose gradient is pure rounding noise (see
test_distributed.visible_to_bradley_terry) that Adam scales up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_components import train_reward_model
from rlhf_components.core import checkpoint, storage
from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run
from rlhf_components.demo import DemoAssets

from ._helpers import sentiment_pairs, write_jsonl

pytestmark = pytest.mark.slow

PPO_CONFIG = {
    "total_episodes": 48,
    "rollout_batch_size": 8,
    "num_minibatches": 2,
    "ppo_epochs": 2,
    "learning_rate": 0.001,
    "checkpoint_every": 1,
    "sampling": {"max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def reward_model(tiny_assets: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("resume-rm")
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="rm")
    uri, run_id = start_pipeline_run(tracking, "rm", {}, {})
    context = RunContext(tracking_uri=uri, experiment="rm", parent_run_id=run_id, output_root=str(root))
    pairs = [{"prompt": "Review of a cafe:", "chosen": " lovely food", "rejected": " awful food"}] * 8
    storage.write_jsonl(str(root / "pairs.jsonl"), pairs)
    inputs = train_reward_model.Inputs(
        base_model=tiny_assets.sft_model_dir, train=str(root / "pairs.jsonl"), eval=str(root / "pairs.jsonl")
    )
    return train_reward_model.run(train_reward_model.Config(batch_size=8), inputs, context).reward_model


def standalone_job(
    tmp_path: Path, name: str, step: str, inputs: dict[str, str], config: dict[str, object]
) -> tuple[Path, Path]:
    """A standalone job of `step` under its own parent run; returns (job file, the run's step output dir)."""
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "resume"}
    _, parent = start_pipeline_run(TrackingConfig(**tracking), name, {}, {})
    job = {
        "context": {"tracking": tracking, "output_root": str(tmp_path / name), "parent_run_id": parent},
        "inputs": inputs,
        "config": config,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path, tmp_path / name / parent / step


def ppo_job(
    tmp_path: Path, name: str, tiny_assets: DemoAssets, reward_model: str, **config: object
) -> tuple[Path, Path]:
    inputs = {
        "policy": tiny_assets.sft_model_dir,
        "reward_model": reward_model,
        "prompts": tiny_assets.prompts_file,
    }
    return standalone_job(tmp_path, name, "ppo", inputs, {**PPO_CONFIG, **config})


def start(job: Path, step: str = "ppo") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"rlhf_components.{step}", "--config", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )


def finish(process: subprocess.Popen[str]) -> str:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def latest_step(step_dir: Path) -> int:
    latest = step_dir / "checkpoint" / checkpoint.LATEST
    return int(json.loads(latest.read_text())["step"]) if latest.is_file() else 0


def kill_after_two_checkpoints(process: subprocess.Popen[str], step_dir: Path) -> int:
    """SIGKILL the run once its second checkpoint is written; returns the step of its last checkpoint."""
    deadline = time.monotonic() + 300
    while latest_step(step_dir) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return latest_step(step_dir)


def assert_same_weights(whole: Path, resumed: Path) -> None:
    whole_weights = load_file(str(whole / "model.safetensors"))
    resumed_weights = load_file(str(resumed / "model.safetensors"))
    assert whole_weights.keys() == resumed_weights.keys()
    for name, tensor in whole_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_killed_and_resumed_run_equals_uninterrupted_run(
    tiny_assets: DemoAssets, reward_model: str, tmp_path: Path
) -> None:
    whole_job, whole_dir = ppo_job(tmp_path, "whole", tiny_assets, reward_model)
    cut_job, cut_dir = ppo_job(tmp_path, "cut", tiny_assets, reward_model)
    whole = start(whole_job)
    killed_at = kill_after_two_checkpoints(start(cut_job), cut_dir)
    assert 2 <= killed_at < 6, "the run must be killed part-way"
    assert not (cut_dir / "policy").exists()

    resumed_log = finish(start(cut_job))
    assert f"after iteration {killed_at}" in resumed_log or "resumed from" in resumed_log
    finish(whole)
    assert_same_weights(whole_dir / "policy", cut_dir / "policy")
    # Only the newest step directory is kept next to the pointer.
    assert sorted(p.name for p in (cut_dir / "checkpoint").iterdir()) == ["latest.json", "step-00000005"]


def test_killed_and_resumed_lora_run_equals_uninterrupted_run(
    tiny_assets: DemoAssets, reward_model: str, tmp_path: Path
) -> None:
    """Under LoRA a checkpoint holds the adapters, the value head and their optimizer state, not the bases."""
    lora = {"lora": {"rank": 4, "alpha": 8.0}}
    whole_job, whole_dir = ppo_job(tmp_path, "whole", tiny_assets, reward_model, **lora)
    cut_job, cut_dir = ppo_job(tmp_path, "cut", tiny_assets, reward_model, **lora)
    whole = start(whole_job)
    killed_at = kill_after_two_checkpoints(start(cut_job), cut_dir)
    assert 2 <= killed_at < 6, "the run must be killed part-way"
    saved = load_file(str(cut_dir / "checkpoint" / f"step-{killed_at:08d}" / checkpoint.TENSORS))
    weights = [key for key in saved if key.startswith(("policy.", "value."))]
    assert weights and all("lora_" in key or "modules_to_save" in key for key in weights), weights

    finish(start(cut_job))
    finish(whole)
    assert_same_weights(whole_dir / "policy", cut_dir / "policy")
    whole_adapter = load_file(str(whole_dir / "policy_adapter" / "adapter_model.safetensors"))
    cut_adapter = load_file(str(cut_dir / "policy_adapter" / "adapter_model.safetensors"))
    assert whole_adapter.keys() == cut_adapter.keys()
    assert all(torch.equal(tensor, cut_adapter[key]) for key, tensor in whole_adapter.items())


def test_sigterm_checkpoints_then_stops_with_one_line(
    tiny_assets: DemoAssets, reward_model: str, tmp_path: Path
) -> None:
    job, ppo_dir = ppo_job(tmp_path, "term", tiny_assets, reward_model)
    config = yaml.safe_load(job.read_text())
    # Long enough that the signal always lands in training, never after the last iteration.
    config["config"] = {**PPO_CONFIG, "checkpoint_every": 0, "total_episodes": 480}
    job.write_text(yaml.safe_dump(config), encoding="utf-8")
    process = start(job)
    # Training is under way once the PPO child run has logged its first iteration.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        runs = client.search_runs(
            [client.get_experiment_by_name("resume").experiment_id], filter_string="tags.`rlhf.step` = 'ppo'"
        )
        if runs and "score" in runs[0].data.metrics:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    assert "stopped by SIGTERM after iteration" in stderr.strip().splitlines()[-1]
    assert latest_step(ppo_dir) >= 1


def test_killed_and_resumed_reward_model_equals_uninterrupted_one(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(96, seed=31))
    inputs = {"base_model": tiny_assets.sft_model_dir, "train": str(pairs), "eval": str(pairs)}
    config = {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "max_length": 64, "checkpoint_every": 1}
    whole_job, whole_dir = standalone_job(tmp_path, "whole", "train_reward_model", inputs, config)
    cut_job, cut_dir = standalone_job(tmp_path, "cut", "train_reward_model", inputs, config)
    whole = start(whole_job, "train_reward_model")
    killed_at = kill_after_two_checkpoints(start(cut_job, "train_reward_model"), cut_dir)
    assert 2 <= killed_at < 48, "the run must be killed part-way"
    assert not (cut_dir / "model").exists()

    resumed_log = finish(start(cut_job, "train_reward_model"))
    assert f"resumed from {cut_dir / 'checkpoint'} after step {killed_at}" in resumed_log
    finish(whole)
    assert_same_weights(whole_dir / "model", cut_dir / "model")
    # The reward normalisation is computed from the final weights: the same too.
    resumed_config = json.loads((cut_dir / "model" / "config.json").read_text())
    assert json.loads((whole_dir / "model" / "config.json").read_text()) == resumed_config
