"""The grpo pipelines through kfp.local, driven by `rlhf run`. grpo: tiny arithmetic demo assets, GRPO on two
torchrun workers with an exact-match reward on the prompts' `answer` column, evaluated by an LLM judge served
over HTTP (tests/integration/judge_server.py), and gated on its judge_win_rate. grpo-feedback: the reward
model trained from this run's feedback is GRPO's reward."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from integration.judge_server import requests_seen, serving

from rlhf_components.demo import DemoAssets, DemoAssetsSpec, build_demo_assets

from .test_pipeline_local import STEPS, _plain, rlhf_run, tiny_pipeline_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRPO_STEPS = ["collect_prompts", "grpo", "evaluate", "register_and_promote"]


@pytest.fixture(scope="module")
def arithmetic_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    spec = DemoAssetsSpec(task="arithmetic", n_corpus=600, sft_steps=60, n_embd=32, n_head=2, n_layer=1)
    return build_demo_assets(tmp_path_factory.mktemp("arithmetic-assets"), spec)


@pytest.fixture
def judge_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")  # the tasks inherit it; the config never holds it
    with serving(tmp_path) as url:
        yield url


def test_rlhf_run_of_the_grpo_pipeline_registers_the_grpo_policy(
    arithmetic_assets: DemoAssets, judge_url: str, tmp_path: Path
) -> None:
    config = {
        "name": "tiny-grpo",
        "pipeline": "grpo",
        "policy": arithmetic_assets.sft_model_dir,
        "storage_root": str(tmp_path / "outputs"),
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "e2e-grpo"},
        "collect_prompts": {
            "sources": [arithmetic_assets.prompts_file],
            "columns": ["answer"],
            "eval_fraction": 0.2,
        },
        "grpo": {
            "rewards": [{"function": "exact_match"}, {"function": "length", "options": {"target": 3}}],
            "launcher": "torchrun",
            "workers": 2,
            "prompts_per_step": 4,
            "num_generations": 4,
            "total_episodes": 48,
            "beta": 0.04,
            "learning_rate": 0.001,
            "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        },
        "evaluate": {
            "max_prompts": 10,
            "bootstrap_samples": 200,
            "gold_judge": "demo-arithmetic",
            "judge": {"url": judge_url, "model": "gold:demo-arithmetic"},
            "sampling": {"temperature": 0.01, "max_new_tokens": 6},
            "kl_sampling": {"temperature": 1.0, "max_new_tokens": 6},
        },
        "register_and_promote": {
            "policy_name": "tiny-grpo-policy",
            "gate": {"metric": "judge_win_rate", "min_ci_low": 0.0, "max_kl": 100.0},
        },
    }
    config_path = tmp_path / "grpo.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = rlhf_run(config_path, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("start-run", *(s.replace("_", "-") for s in GRPO_STEPS)):
        assert f"Task '{step}' finished with status" in _plain(done.stdout + done.stderr), step

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rm_win_rate"] is None and summary["reward_model_accuracy"] is None
    # The served judge is the hidden checker, asked in both orders: it agrees with the gold win rate.
    assert summary["judge_win_rate"] == summary["gold_win_rate"]
    assert 0.0 <= summary["gold_score"] <= 1.0 and 0.0 <= summary["reference_gold_score"] <= 1.0
    assert 0 < summary["evaluation"]["judge_requests"] <= requests_seen(judge_url)
    assert summary["promoted"] is True and set(summary["registered"]) == {"policy"}

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tiny-grpo-policy", "production")
    assert str(version.version) == summary["registered"]["policy"]["version"]
    assert version.tags["rlhf.gate.decision"] == "promote"
    assert version.tags["rlhf.gate.reasons"].startswith("judge_win_rate CI low")
    assert "rlhf.prompts_hash" in version.tags and "rlhf.feedback_hash" not in version.tags
    assert [m.name for m in client.search_registered_models()] == ["tiny-grpo-policy"]

    parent = client.get_run(summary["pipeline_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(run.data.tags["rlhf.step"] for run in children) == sorted(GRPO_STEPS)
    grpo_run = next(run for run in children if run.data.tags["rlhf.step"] == "grpo")
    logged = set(grpo_run.data.metrics)
    assert {"reward", "reward/exact_match", "reward/length", "zero_std_group_fraction", "kl"} <= logged
    assert {"clip_low_fraction", "clip_high_fraction", "entropy", "completion_length"} <= logged
    assert {"episodes_per_second", "reward_std_within_groups"} <= logged
    # The kept `answer` column reached the reward: the prompts' train split still carries it.
    train = tmp_path / "outputs" / summary["pipeline_run_id"] / "collect_prompts" / "train.jsonl"
    first = json.loads(train.read_text().splitlines()[0])
    assert set(first) == {"id", "prompt", "source", "answer"}


def test_the_grpo_feedback_pipeline_trains_on_the_reward_model_it_trains(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    config = tiny_pipeline_config(tiny_assets, tmp_path)
    del config["ppo"]
    config["train_reward_model"] = {"learning_rate": 0.001, "batch_size": 16}
    config |= {
        "name": "tiny-grpo-feedback",
        "pipeline": "grpo-feedback",
        "grpo": {  # no rewards of its own: the reward model this run trains is the only one
            "prompts_per_step": 4,
            "num_generations": 2,
            "total_episodes": 16,
            "learning_rate": 0.001,
            "sampling": {"temperature": 1.0, "max_new_tokens": 12},
        },
    }
    config_path = tmp_path / "grpo-feedback.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = rlhf_run(config_path, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert isinstance(summary["rm_win_rate"], float) and isinstance(summary["reward_model_accuracy"], float)
    assert summary["promoted"] is True and set(summary["registered"]) == {"policy", "reward_model"}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tiny-policy", "production")
    assert {"rlhf.feedback_hash", "rlhf.reward_model_version"} <= set(version.tags)
    parent = client.get_run(summary["pipeline_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    steps = [s for s in STEPS if s != "ppo"] + ["grpo"]
    assert sorted(run.data.tags["rlhf.step"] for run in children) == sorted(steps)
    grpo_run = next(run for run in children if run.data.tags["rlhf.step"] == "grpo")
    assert "reward/trained_reward_model" in grpo_run.data.metrics
