"""register_and_promote: the evidence gate, registration with lineage and aliases, and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from rlhf_components import register_and_promote
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext, code_version
from rlhf_components.demo import DemoAssets
from rlhf_components.register_and_promote import registry
from rlhf_components.register_and_promote.step import GateConfig, gate_decision

from ._helpers import child_runs, make_context, tiny_reward_model

PASSING = {
    "rm_win_rate": 0.7,
    "rm_win_rate_ci_low": 0.6,
    "rm_win_rate_ci_high": 0.8,
    "kl": 2.5,
    "gold_win_rate": 0.68,
}
FAILING = {"rm_win_rate": 0.45, "rm_win_rate_ci_low": 0.3, "rm_win_rate_ci_high": 0.6, "kl": 2.5}
LINEAGE = {"config_hash": "cfg-0123abcd", "prompts_hash": "p-4567", "feedback_hash": "f-89ab"}
POLICY, REWARD = "test-policy", "test-reward-model"


# --- the gate, on crafted metrics ---------------------------------------------------------------


def test_gate_promotes_on_evidence() -> None:
    promoted, reasons = gate_decision(GateConfig(), {"rm_win_rate_ci_low": 0.62, "kl": 3.0})
    assert promoted
    assert reasons == ["rm_win_rate CI low 0.620 > 0.5", "KL 3.000 < 25.0"]


def test_gate_holds_when_ci_low_is_too_low() -> None:
    promoted, reasons = gate_decision(GateConfig(), {"rm_win_rate_ci_low": 0.45, "kl": 3.0})
    assert not promoted
    assert "rm_win_rate CI low 0.450 <= 0.5" in reasons
    # The bound is strict: a CI touching the threshold is not evidence.
    assert not gate_decision(GateConfig(), {"rm_win_rate_ci_low": 0.5, "kl": 3.0})[0]
    assert gate_decision(GateConfig(min_ci_low=0.4), {"rm_win_rate_ci_low": 0.45, "kl": 3.0})[0]


def test_gate_holds_when_kl_is_too_high() -> None:
    promoted, reasons = gate_decision(GateConfig(max_kl=10.0), {"rm_win_rate_ci_low": 0.9, "kl": 12.5})
    assert not promoted
    assert "KL 12.500 >= 10.0" in reasons
    assert "rm_win_rate CI low 0.900 > 0.5" in reasons, "every check is reported, passed or not"


def test_gate_holds_when_it_does_not_beat_the_champion() -> None:
    metrics = {"rm_win_rate_ci_low": 0.7, "kl": 1.0, "rm_win_rate_vs_champion_ci_low": 0.42}
    promoted, reasons = gate_decision(GateConfig(), metrics)
    assert not promoted
    assert "does not beat the champion: CI low 0.420 <= 0.5" in reasons
    promoted, reasons = gate_decision(GateConfig(), {**metrics, "rm_win_rate_vs_champion_ci_low": 0.55})
    assert promoted
    assert "beats the champion: CI low 0.550 > 0.5" in reasons
    assert gate_decision(GateConfig(must_beat_champion=False), metrics)[0]


def test_gate_uses_the_configured_metric() -> None:
    metrics = {"rm_win_rate_ci_low": 0.3, "gold_win_rate_ci_low": 0.7, "kl": 1.0}
    assert not gate_decision(GateConfig(), metrics)[0]
    promoted, reasons = gate_decision(GateConfig(metric="gold_win_rate"), metrics)
    assert promoted
    assert reasons[0] == "gold_win_rate CI low 0.700 > 0.5"


def test_gate_holds_on_missing_or_nan_evidence() -> None:
    promoted, reasons = gate_decision(GateConfig(), {"kl": 1.0, "rm_win_rate": 0.9})
    assert not promoted
    assert reasons == ["evaluation has no rm_win_rate confidence interval"]
    promoted, reasons = gate_decision(GateConfig(), {"rm_win_rate_ci_low": 0.9})
    assert not promoted, "no KL measured is not a KL under the bound"
    assert any(reason.startswith("KL inf") for reason in reasons)
    assert not gate_decision(GateConfig(), {"rm_win_rate_ci_low": float("nan"), "kl": 1.0})[0]
    assert not gate_decision(GateConfig(), {"rm_win_rate_ci_low": 0.9, "kl": float("nan")})[0]


# --- registration against a sqlite store ---------------------------------------------------------


def _register(
    tiny_assets: DemoAssets,
    reward_model: str,
    context: RunContext,
    evaluation: dict[str, float],
    parent_version: str | None = None,
) -> register_and_promote.Outputs:
    config = register_and_promote.Config(policy_name=POLICY, reward_model_name=REWARD)
    inputs = register_and_promote.Inputs(
        policy=tiny_assets.sft_model_dir,
        reward_model=reward_model,
        evaluation=evaluation,
        reward_model_accuracy=0.9,
        lineage=LINEAGE,
        parent_version=parent_version,
    )
    return register_and_promote.run(config, inputs, context)


def test_register_gate_aliases_and_rollback(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_assets: DemoAssets,
    run_context: RunContext,
) -> None:
    reward_model = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    client = mlflow.MlflowClient(tracking_uri=run_context.tracking_uri)

    # 1. Evidence clears the gate: both models registered, staging and production.
    first = _register(tiny_assets, reward_model, run_context, PASSING)
    assert first.promoted
    assert first.registered["policy"].model_dump() == {
        "name": POLICY,
        "version": "1",
        "aliases": ["production", "staging"],
    }
    assert first.registered["reward_model"].model_dump() == {
        "name": REWARD,
        "version": "1",
        "aliases": ["production", "staging"],
    }
    for name in (POLICY, REWARD):
        version = client.get_model_version(name, "1")
        assert isinstance(version.version, str | int)
        tags = version.tags
        assert tags["rlhf.pipeline_run_id"] == run_context.parent_run_id
        assert tags["rlhf.config_hash"] == LINEAGE["config_hash"]
        assert tags["rlhf.prompts_hash"] == LINEAGE["prompts_hash"]
        assert tags["rlhf.feedback_hash"] == LINEAGE["feedback_hash"]
        assert tags["rlhf.parent_version"] == "none"
        assert tags["rlhf.git_sha"] == code_version() != "unknown"  # the tests run from the checkout
        assert "rlhf.production.decision" in tags and "rlhf.staging.decision" in tags
        assert str(client.get_model_version_by_alias(name, "production").version) == "1"
    policy_tags = client.get_model_version(POLICY, "1").tags
    assert policy_tags["rlhf.gate.decision"] == "promote"
    assert policy_tags["rlhf.gate.reasons"] == "; ".join(first.reasons)
    assert "rm_win_rate CI low 0.600 > 0.5" in policy_tags["rlhf.gate.reasons"]
    assert policy_tags["rlhf.reward_model_version"] == "1"
    assert float(policy_tags["rlhf.eval.rm_win_rate_ci_low"]) == pytest.approx(0.6)
    assert registry.production_history(POLICY) == ["1"]

    summary = json.loads(Path(first.summary).read_text(encoding="utf-8"))
    assert summary["promoted"] is True
    assert summary["pipeline_run_id"] == run_context.parent_run_id
    assert summary["gate_reasons"] == first.reasons
    assert summary["registered"] == {key: value.model_dump() for key, value in first.registered.items()}
    assert summary["evaluation"] == PASSING
    [step_run] = child_runs(run_context, "register_and_promote")
    assert step_run.data.tags["rlhf.gate"].startswith("PROMOTED: ")
    assert "summary.json" in {a.path for a in client.list_artifacts(step_run.info.run_id)}

    # 2. The next candidate does not clear it: staging moves, production stays.
    second_context = make_context(tmp_path)  # the same store, a new pipeline run
    assert second_context.tracking_uri == run_context.tracking_uri
    second = _register(tiny_assets, reward_model, second_context, FAILING, parent_version="1")
    assert not second.promoted
    assert second.registered["policy"].model_dump() == {
        "name": POLICY,
        "version": "2",
        "aliases": ["staging"],
    }
    assert second.registered["reward_model"].aliases == ["staging"]
    assert registry.alias_version(POLICY, "production") == "1"
    assert registry.alias_version(POLICY, "staging") == "2"
    assert registry.alias_version(REWARD, "production") == "1"
    assert client.get_model_version(POLICY, "1").aliases == ["production"]
    held = client.get_model_version(POLICY, "2").tags
    assert held["rlhf.gate.decision"] == "hold"
    assert "rm_win_rate CI low 0.300 <= 0.5" in held["rlhf.gate.reasons"]
    assert held["rlhf.parent_version"] == "1"
    assert held["rlhf.pipeline_run_id"] == second_context.parent_run_id
    assert "rlhf.production.decision" not in held
    assert json.loads(Path(second.summary).read_text(encoding="utf-8"))["promoted"] is False
    [held_run] = child_runs(second_context, "register_and_promote")
    assert held_run.data.tags["rlhf.gate"].startswith("NOT PROMOTED: ")

    # 3. A second promotion (by hand), then rollback walks production back.
    registry.promote(POLICY, "2", "production", "promoted by hand after review")
    assert registry.alias_version(POLICY, "production") == "2"
    assert registry.production_history(POLICY) == ["1", "2"]
    assert registry.rollback(POLICY) == ("2", "1")
    assert registry.alias_version(POLICY, "production") == "1"
    assert registry.alias_version(POLICY, "staging") == "2", "rollback leaves staging alone"
    assert registry.production_history(POLICY) == ["1"]
    assert "rolled back to 1" in client.get_model_version(POLICY, "2").tags["rlhf.production.decision"]
    assert "restored by rollback" in client.get_model_version(POLICY, "1").tags["rlhf.production.decision"]
    with pytest.raises(UserError, match="no earlier production version"):
        registry.rollback(POLICY)
    with pytest.raises(UserError, match="no earlier production version"):
        registry.rollback(REWARD)

    # Bad requests are user errors, not tracebacks.
    with pytest.raises(UserError, match="unknown stage"):
        registry.promote(POLICY, "1", "prod")
    with pytest.raises(UserError, match="version 99"):
        registry.promote(POLICY, "99", "production")
    with pytest.raises(UserError):
        registry.rollback("no-such-model")


def test_legacy_stage_follows_promotion_and_rollback(tmp_path: Path, run_context: RunContext) -> None:
    """Clients still reading `models:/name/Production` must see what the `production` alias sees."""
    mlflow.set_tracking_uri(run_context.tracking_uri)
    client = mlflow.MlflowClient()
    client.create_registered_model("stage-model")
    for _ in range(2):
        client.create_model_version("stage-model", source=str(tmp_path), run_id=None)

    def in_production() -> list[str]:
        return [str(v.version) for v in client.get_latest_versions("stage-model", stages=["Production"])]

    registry.promote("stage-model", "1", "production")
    registry.promote("stage-model", "1", "production")
    assert registry.production_history("stage-model") == ["1"], "re-promoting the same version is one move"
    registry.promote("stage-model", "2", "production")
    assert in_production() == ["2"]
    assert str(client.get_model_version("stage-model", "1").current_stage) == "Archived"
    assert registry.rollback("stage-model") == ("2", "1")
    assert registry.alias_version("stage-model", "production") == "1"
    assert in_production() == ["1"]
