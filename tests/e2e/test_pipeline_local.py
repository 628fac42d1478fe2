"""The whole DAG through kfp.local (SubprocessRunner), at tiny sizes, driven by the `rlhf run` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from rlhf_components.demo import DemoAssets

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = [
    "collect_prompts",
    "generate_candidates",
    "ingest_feedback",
    "train_reward_model",
    "ppo",
    "evaluate",
    "register_and_promote",
]


def tiny_pipeline_config(assets: DemoAssets, root: Path) -> dict[str, object]:
    return {
        "name": "tiny",
        "policy": assets.sft_model_dir,
        "storage_root": str(root / "outputs"),
        "feedback_inbox": str(root / "inbox"),
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "e2e"},
        "collect_prompts": {"sources": [assets.prompts_file], "eval_fraction": 0.25},
        "generate_candidates": {
            "samples_per_prompt": 2,
            "sampling": {"temperature": 1.0, "max_new_tokens": 12},
        },
        "ingest_feedback": {"simulated_annotator": "demo-gold-sentiment"},
        # Both trainers on 2 torchrun workers: the distributed path runs inside kfp.local like any step.
        "train_reward_model": {
            "learning_rate": 0.001,
            "batch_size": 16,
            "launcher": "torchrun",
            "workers": 2,
        },
        "ppo": {
            "launcher": "torchrun",
            "workers": 2,
            "total_episodes": 32,
            "rollout_batch_size": 16,
            "num_minibatches": 2,
            "ppo_epochs": 1,
            "sampling": {"max_new_tokens": 12},
        },
        "evaluate": {"max_prompts": 12, "gold_judge": "demo-gold-sentiment", "bootstrap_samples": 200},
        "register_and_promote": {
            "policy_name": "tiny-policy",
            "reward_model_name": "tiny-rm",
            "gate": {"min_ci_low": 0.0, "max_kl": 100.0},
        },
    }


def rlhf_run(config_path: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """The installed `rlhf run`, as a user types it."""
    rlhf = Path(sys.executable).parent / "rlhf"
    return subprocess.run(
        [str(rlhf), "run", str(config_path), "--workdir", str(workdir)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_rlhf_run_executes_the_dag_and_registers_models(tiny_assets: DemoAssets, tmp_path: Path) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_pipeline_config(tiny_assets, tmp_path)), encoding="utf-8")
    done = rlhf_run(config_path, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("start-run", *(s.replace("_", "-") for s in STEPS)):
        assert f"Task '{step}' finished with status" in _plain(done.stdout + done.stderr), step
    assert "pipeline summary" in done.stdout

    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("gold_win_rate", "rm_win_rate", "kl", "reward_model_accuracy"):
        assert isinstance(summary[key], float), key
    assert 0.0 <= summary["gold_win_rate"] <= 1.0
    policy, reward = summary["registered"]["policy"], summary["registered"]["reward_model"]
    assert (policy["name"], reward["name"]) == ("tiny-policy", "tiny-rm")
    # The gate is opened wide in this config: the candidate must be promoted.
    assert summary["promoted"] is True
    assert policy["aliases"] == ["production", "staging"]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tiny-policy", "production")
    assert str(version.version) == policy["version"]
    assert version.tags["rlhf.pipeline_run_id"] == summary["pipeline_run_id"]
    assert version.tags["rlhf.gate.decision"] == "promote"
    for lineage in ("rlhf.prompts_hash", "rlhf.feedback_hash", "rlhf.config_hash", "rlhf.parent_version"):
        assert lineage in version.tags
    assert str(client.get_model_version_by_alias("tiny-rm", "staging").version) == reward["version"]

    parent = client.get_run(summary["pipeline_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ppo.rollout_batch_size"] == "16"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    # One run per step: of each distributed step's two workers, only rank 0 records.
    assert sorted(run.data.tags["rlhf.step"] for run in children) == sorted(STEPS)

    run_dir = tmp_path / "outputs" / summary["pipeline_run_id"]
    assert (run_dir / "collect_prompts" / "manifest.json").is_file()
    assert (run_dir / "ppo" / "policy" / "model.safetensors").is_file()
    labels = list((tmp_path / "inbox" / "labels").glob("simulated-*.jsonl"))
    assert len(labels) == 1 and '"simulated": true' in labels[0].read_text()

    # The KFP artifacts beside the JSON outputs: what the KFP UI shows of the run.
    [tasks] = list((tmp_path / "kfp-local").glob("rlhf-*"))
    decision = (tasks / "register-and-promote" / "decision").read_text()
    assert decision.startswith("# Gate: promoted to production") and "| policy | tiny-policy |" in decision
    registered = json.loads((tasks / "register-and-promote" / "registered_policy").read_text())
    assert registered["uri"] == f"models:/tiny-policy/{policy['version']}"
    registered = json.loads((tasks / "register-and-promote" / "registered_reward_model").read_text())
    assert (registered["registered_model"], registered["model_version"]) == ("tiny-rm", reward["version"])
    evaluated = json.loads((tasks / "evaluate" / "executor_output.json").read_text())["artifacts"]
    [metrics] = evaluated["metrics"]["artifacts"]
    assert metrics["metadata"]["gold_win_rate"] == summary["gold_win_rate"]
    page = (tasks / "evaluate" / "report").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'src="data:image/png;base64,' in page
    assert "Training curves (ppo)" in page  # read back from the PPO step's MLflow run
    [prompts] = json.loads((tasks / "collect-prompts" / "executor_output.json").read_text())["artifacts"][
        "prompt_dataset"
    ]["artifacts"]
    assert prompts["metadata"]["content_hash"] == version.tags["rlhf.prompts_hash"]


def test_rlhf_run_of_the_dpo_pipeline_registers_the_dpo_policy(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    config = tiny_pipeline_config(tiny_assets, tmp_path)
    del config["train_reward_model"], config["ppo"]
    # DPO with LoRA here (the RLHF run above trains in full): the adapter travels to the registry.
    config |= {
        "name": "tiny-dpo",
        "pipeline": "dpo",
        "dpo": {
            "epochs": 2,
            "batch_size": 16,
            "learning_rate": 0.005,
            "max_length": 64,
            "lora": {"rank": 8, "alpha": 16},
        },
    }
    config["register_and_promote"] = {
        "policy_name": "tiny-dpo-policy",
        "gate": {"metric": "gold_win_rate", "min_ci_low": 0.0, "max_kl": 100.0},
    }
    config_path = tmp_path / "dpo.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = rlhf_run(config_path, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Task 'dpo' finished with status" in _plain(done.stdout + done.stderr)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= summary["gold_win_rate"] <= 1.0 and summary["rm_win_rate"] is None
    assert summary["promoted"] is True and set(summary["registered"]) == {"policy"}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tiny-dpo-policy", "production")
    assert str(version.version) == summary["registered"]["policy"]["version"]
    assert version.tags["rlhf.gate.decision"] == "promote"
    assert "rlhf.reward_model_version" not in version.tags
    adapter = mlflow.artifacts.download_artifacts(
        version.tags["rlhf.adapter"], dst_path=str(tmp_path / "a"), tracking_uri=client.tracking_uri
    )
    assert json.loads((Path(adapter) / "adapter_config.json").read_text())["r"] == 8
    assert [m.name for m in client.search_registered_models()] == ["tiny-dpo-policy"]
    parent = client.get_run(summary["pipeline_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    dpo_steps = [*(s for s in STEPS if s not in {"train_reward_model", "ppo"}), "dpo"]
    assert sorted(run.data.tags["rlhf.step"] for run in children) == sorted(dpo_steps)
    dpo_run = next(run for run in children if run.data.tags["rlhf.step"] == "dpo")
    assert {"loss", "reward_accuracy", "eval_reward_accuracy"} <= set(dpo_run.data.metrics)


def _plain(text: str) -> str:
    """kfp.local colours task names with ANSI escapes."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def failing_feedback_config(assets: DemoAssets, root: Path) -> dict[str, object]:
    """The tiny config with a broken label file in its inbox and no invalid record allowed: ingest_feedback
    fails."""
    config = tiny_pipeline_config(assets, root)
    config["ingest_feedback"] = {"simulated_annotator": "demo-gold-sentiment", "max_invalid_fraction": 0.0}
    labels = root / "inbox" / "labels"
    labels.mkdir(parents=True)
    (labels / "bad.jsonl").write_text('{"broken\n', encoding="utf-8")
    return config


def test_failing_step_ends_in_one_line_and_a_failed_parent_run(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    config = failing_feedback_config(tiny_assets, tmp_path)
    config_path = tmp_path / "failing.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = rlhf_run(config_path, tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pipeline tiny failed at step ingest_feedback:"), last
    assert "bad.jsonl" in last and "invalid" in last
    assert not (tmp_path / "summary.json").exists()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`rlhf.kind` = 'pipeline'")
    assert [run.info.status for run in parents] == ["FAILED"]
    assert parents[0].data.tags["rlhf.failed_step"] == "ingest_feedback"
    assert last.endswith(parents[0].data.tags["rlhf.failure"] + " (step logs above)")
    quarantine = next((tmp_path / "outputs").glob("*/ingest_feedback/quarantine.jsonl"))
    assert "bad.jsonl:1" in quarantine.read_text()
