"""Register the PPO policy and its reward model, then let the evaluation gate decide on production.

Every version carries lineage tags (pipeline run, dataset hashes, parent version, config hash, git sha) and
the gate's decision with its reasons. A model trained with LoRA has its adapter logged beside it (artifact
`<role>_adapter`, named by the version's `rlhf.adapter` tag), so `lora.adapter: models:/name@alias` can
continue it. `staging` always moves to the new policy; `production` only when the
evidence clears the gate.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers

from rlhf_components.core import storage
from rlhf_components.core.config import ModelStep
from rlhf_components.core.lora import ADAPTER_TAG
from rlhf_components.core.models import load_policy, load_scalar_model
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, code_version, step_run
from rlhf_components.register_and_promote import registry
from rlhf_components.register_and_promote.config import Config, GateConfig, Inputs, Outputs, RegisteredVersion

log = logging.getLogger(__name__)


def gate_decision(gate: GateConfig, metrics: dict[str, float]) -> tuple[bool, list[str]]:
    """(promote?, the reasons), from evaluation evidence alone."""
    reasons: list[str] = []
    passed = True
    low = metrics.get(f"{gate.metric}_ci_low")
    if low is None:
        return False, [f"evaluation has no {gate.metric} confidence interval"]
    if low > gate.min_ci_low:
        reasons.append(f"{gate.metric} CI low {low:.3f} > {gate.min_ci_low}")
    else:
        passed = False
        reasons.append(f"{gate.metric} CI low {low:.3f} <= {gate.min_ci_low}")
    kl = metrics.get("kl", float("inf"))
    if kl < gate.max_kl:
        reasons.append(f"KL {kl:.3f} < {gate.max_kl}")
    else:
        passed = False
        reasons.append(f"KL {kl:.3f} >= {gate.max_kl}")
    champion_low = metrics.get(f"{gate.metric}_vs_champion_ci_low")
    if gate.must_beat_champion and champion_low is not None:
        if champion_low > 0.5:
            reasons.append(f"beats the champion: CI low {champion_low:.3f} > 0.5")
        else:
            passed = False
            reasons.append(f"does not beat the champion: CI low {champion_low:.3f} <= 0.5")
    return passed, reasons


def _log_and_register(
    model: Any, tokenizer: Any, name: str, task: str, artifact: str, adapter: str | None
) -> str:
    """Log and register the model (and its LoRA adapter beside it, where there is one); its version."""
    import mlflow

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name=artifact,
        task=task,
        registered_model_name=name,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
        ],
    )
    version = str(info.registered_model_version)
    if adapter is not None:
        mlflow.log_artifacts(str(storage.local_dir(adapter)), f"{artifact}_adapter")
        adapter_uri = f"runs:/{info.run_id}/{artifact}_adapter"
        mlflow.MlflowClient().set_model_version_tag(name, version, ADAPTER_TAG, adapter_uri)
    return version


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    import mlflow

    with step_run(context, "register_and_promote", config):
        client = mlflow.MlflowClient()
        lineage = {
            "rlhf.pipeline_run_id": context.parent_run_id,
            "rlhf.parent_version": inputs.parent_version or "none",
            "rlhf.git_sha": code_version(),
            **{f"rlhf.{key}": value for key, value in inputs.lineage.items()},
        }
        loading = ModelStep(trust_remote_code=config.trust_remote_code)  # weights in their saved dtype
        policy, fmt = load_policy(inputs.policy, loading)
        versions = {
            "policy": (
                config.policy_name,
                _log_and_register(
                    policy,
                    fmt.tokenizer,
                    config.policy_name,
                    "text-generation",
                    "policy",
                    inputs.policy_adapter,
                ),
            )
        }
        if inputs.reward_model is not None:
            reward_model, reward_fmt = load_scalar_model(inputs.reward_model, loading)
            versions["reward_model"] = (
                config.reward_model_name,
                _log_and_register(
                    reward_model,
                    reward_fmt.tokenizer,
                    config.reward_model_name,
                    "text-classification",
                    "reward_model",
                    inputs.reward_model_adapter,
                ),
            )
            client.set_model_version_tag(
                config.policy_name,
                versions["policy"][1],
                "rlhf.reward_model_version",
                versions["reward_model"][1],
            )
        policy_version = versions["policy"][1]
        for name, version in versions.values():
            for key, value in lineage.items():
                client.set_model_version_tag(name, version, key, value)
        for key, value in inputs.evaluation.items():
            client.set_model_version_tag(
                config.policy_name, policy_version, f"rlhf.eval.{key}", f"{value:.6g}"
            )

        promoted, reasons = gate_decision(config.gate, inputs.evaluation)
        verdict = ("PROMOTED: " if promoted else "NOT PROMOTED: ") + "; ".join(reasons)
        client.set_model_version_tag(
            config.policy_name, policy_version, "rlhf.gate.decision", "promote" if promoted else "hold"
        )
        client.set_model_version_tag(
            config.policy_name, policy_version, "rlhf.gate.reasons", "; ".join(reasons)
        )
        staging_reason = {
            "policy": "new candidate from the pipeline",
            "reward_model": "trained with the candidate",
        }
        for role, (name, version) in versions.items():
            registry.set_alias(name, version, "staging", staging_reason[role])
            if promoted:
                registry.set_alias(name, version, "production", verdict)
        mlflow.set_tag("rlhf.gate", verdict)
        log.info("gate: %s", verdict)

        registered = {
            role: RegisteredVersion(name=name, version=version, aliases=_aliases(name, version))
            for role, (name, version) in versions.items()
        }
        summary = {
            "pipeline_run_id": context.parent_run_id,
            "gold_win_rate": inputs.evaluation.get("gold_win_rate"),
            "rm_win_rate": inputs.evaluation.get("rm_win_rate"),
            "judge_win_rate": inputs.evaluation.get("judge_win_rate"),
            "reward_win_rate": inputs.evaluation.get("reward_win_rate"),
            "gold_score": inputs.evaluation.get("gold_score"),
            "reference_gold_score": inputs.evaluation.get("reference_gold_score"),
            "reward_score": inputs.evaluation.get("reward_score"),
            "reference_reward_score": inputs.evaluation.get("reference_reward_score"),
            "kl": inputs.evaluation.get("kl"),
            "reward_model_accuracy": inputs.reward_model_accuracy,
            "promoted": promoted,
            "gate_reasons": reasons,
            "evaluation": inputs.evaluation,
            "registered": {key: value.model_dump() for key, value in registered.items()},
        }
        summary_uri = step_output(context, "register_and_promote", "summary.json")
        storage.write_json(summary_uri, summary)
        mlflow.log_dict(summary, "summary.json")
        return Outputs(summary=summary_uri, promoted=promoted, reasons=reasons, registered=registered)


def _aliases(name: str, version: str) -> list[str]:
    import mlflow

    return sorted(mlflow.MlflowClient().get_model_version(name, version).aliases)
