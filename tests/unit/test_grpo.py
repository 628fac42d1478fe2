"""GRPO and RLOO: advantages and loss aggregations against float64 formulas written here, the rewards and
their weights, μ = 1's ratio, β = 0's missing reference, and whole runs on real architectures."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from rlhf_components import grpo
from rlhf_components.core import rewards
from rlhf_components.core.config import Reward, SamplingConfig, validate_mapping
from rlhf_components.core.errors import ConfigError, UserError
from rlhf_components.core.losses import aggregate_loss, clipped_token_loss, group_advantages
from rlhf_components.core.models import load_scalar_model, normalized_rewards, save_checkpoint, score_texts
from rlhf_components.core.tracking import RunContext
from rlhf_components.core.trainer_config import Lora
from rlhf_components.grpo import step as grpo_step

from . import chat_models
from ._helpers import child_runs, write_jsonl

ANSWERS = {"Review of the ramen:": "good", "Review of a small cafe near the station:": "bad"}


# ----------------------------------------------------------------------------- formulas


def test_group_advantages_match_their_definitions() -> None:
    rng = random.Random(0)
    k = 4
    values = [rng.gauss(0, 1) for _ in range(3 * k)] + [0.5] * k  # the last group has no spread
    rewards_ = torch.tensor(values)
    for method, scale in (("grpo", True), ("grpo", False), ("rloo", False)):
        got = group_advantages(rewards_, k, method, scale).tolist()
        for g in range(len(values) // k):
            group = values[g * k : (g + 1) * k]
            mean = sum(group) / k
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (k - 1))
            for i, r in enumerate(group):
                if method == "rloo":
                    expected = r - (sum(group) - r) / (k - 1)
                else:
                    expected = (r - mean) / (std + 1e-4) if scale else r - mean
                assert got[g * k + i] == pytest.approx(expected, abs=1e-5), (method, scale, g, i)
    assert group_advantages(rewards_, k, "grpo", True)[-k:].abs().max() == 0, "a flat group teaches nothing"


def test_clipped_token_loss_and_every_aggregation_match_their_formulas() -> None:
    rng = random.Random(1)
    rows, width, max_tokens = 3, 5, 8
    lengths = [5, 2, 4]
    new = [[rng.gauss(-1, 0.5) for _ in range(width)] for _ in range(rows)]
    old = [[rng.gauss(-1, 0.5) for _ in range(width)] for _ in range(rows)]
    advantages = [1.5, -0.7, 0.3]
    low, high = 0.2, 0.28
    mask = [[1.0 if t < n else 0.0 for t in range(width)] for n in lengths]
    per_token, ratio = clipped_token_loss(
        torch.tensor(new), torch.tensor(old), torch.tensor(advantages), low, high
    )
    expected = []
    for b in range(rows):
        row = []
        for t in range(width):
            r = math.exp(new[b][t] - old[b][t])
            a = advantages[b]
            row.append(-min(r * a, min(max(r, 1 - low), 1 + high) * a))
        expected.append(row)
    assert torch.allclose(per_token.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    losses = [[expected[b][t] * mask[b][t] for t in range(width)] for b in range(rows)]
    formulas = {
        "token": sum(map(sum, losses)) / sum(lengths),
        "sequence": sum(sum(losses[b]) / lengths[b] for b in range(rows)) / rows,
        "dr_grpo": sum(map(sum, losses)) / (rows * max_tokens),
    }
    for mode, value in formulas.items():
        got = aggregate_loss(per_token, torch.tensor(mask), mode, max_tokens).item()
        assert got == pytest.approx(value, abs=1e-6), mode
    assert ratio.shape == (rows, width)


# ----------------------------------------------------------------------------- rewards


def test_built_in_rewards_and_a_module_function_combine_with_their_weights() -> None:
    config = [
        Reward(function="exact_match", weight=2.0),
        Reward(function="regex", options={"pattern": r"[a-z]+"}, weight=0.5),
        Reward(function="length", options={"target": 4}),
        Reward(function=f"{__name__}:shouting", weight=-1.0, name="shout"),
    ]
    scorers = rewards.load(
        config, grpo.Config(rewards=config), torch.device("cpu"), torch.float32, "grpo.rewards"
    )
    completions = ["good", " bad ", "GOOD!"]
    columns: dict[str, list[Any]] = {"answer": ["good", "good", "good"]}
    scores = {s.name: s.score(["p"] * 3, completions, columns).tolist() for s in scorers}
    assert scores == {
        "exact_match": [1.0, 0.0, 0.0],
        "regex": [1.0, 1.0, 0.0],
        "length": [0.0, -0.25, -0.25],
        "shout": [0.0, 0.0, 1.0],
    }
    total = sum(s.weight * torch.tensor(scores[s.name]) for s in scorers)
    assert total.tolist() == pytest.approx([2.5, 0.25, -1.25])


def shouting(prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
    return [float(c.isupper()) for c in completions]


def wrong_length(prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
    return [1.0]


def test_reward_mistakes_name_the_reward() -> None:
    with pytest.raises(ConfigError, match=r"neither a built-in .* nor module:function"):
        validate_mapping(grpo.Config, {"rewards": [{"function": "nope"}]}, "job.yaml")
    with pytest.raises(ConfigError, match="set exactly one of function, reward_model and url"):
        validate_mapping(grpo.Config, {"rewards": [{}]}, "job.yaml")
    cpu = torch.device("cpu")
    missing = [Reward(function="no_such_module:f")]
    with pytest.raises(UserError, match=r"grpo\.rewards\[0\]\.function: cannot import no_such_module:f"):
        rewards.load(missing, grpo.Config(rewards=missing), cpu, torch.float32, "grpo.rewards")
    short = [Reward(function=f"{__name__}:wrong_length")]
    scorer = rewards.load(short, grpo.Config(rewards=short), cpu, torch.float32, "grpo.rewards")[0]
    with pytest.raises(UserError, match=r"grpo\.rewards\[0\]: .* one finite number per completion \(2\)"):
        scorer.score(["p", "q"], ["a", "b"], {})


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return chat_models.build_checkpoint("llama3", tmp_path_factory.mktemp("grpo-llama") / "llama3")


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The policies GRPO loads, in order."""
    uris: list[str] = []
    real = grpo_step.load_policy

    def counting(uri: str, *args: Any, **kwargs: Any) -> Any:
        uris.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(grpo_step, "load_policy", counting)
    return uris


def prompts_file(tmp_path: Path) -> str:
    rows = [{"prompt": prompt, "answer": answer} for prompt, answer in ANSWERS.items()]
    return str(write_jsonl(tmp_path / "prompts.jsonl", rows))


def config(**changes: Any) -> grpo.Config:
    base = {
        "rewards": [{"function": "length", "options": {"target": 12}}, {"function": "exact_match"}],
        "total_episodes": 16,
        "prompts_per_step": 2,
        "num_generations": 4,
        "learning_rate": 1e-3,
        "sampling": SamplingConfig(temperature=1.0, max_new_tokens=8),
    }
    return grpo.Config.model_validate(base | changes)


def test_mu_1_takes_ratio_1_exactly_and_beta_0_loads_no_reference(
    llama: str, tmp_path: Path, run_context: RunContext, loaded: list[str]
) -> None:
    inputs = grpo.Inputs(policy=llama, prompts=prompts_file(tmp_path))
    outputs = grpo.run(config(), inputs, run_context)
    assert loaded == [llama], "β = 0: the policy alone"
    assert outputs.steps == 2 and math.isfinite(outputs.final_reward)
    (run,) = child_runs(run_context, "grpo")
    history = mlflow.MlflowClient().get_metric_history
    assert [m.value for m in history(run.info.run_id, "ratio_mean")] == [1.0, 1.0]
    assert [m.value for m in history(run.info.run_id, "clip_low_fraction")] == [0.0, 0.0]
    for name in (
        "reward/length",
        "reward/exact_match",
        "reward_std_within_groups",
        "zero_std_group_fraction",
        "entropy",
        "completion_length",
        "episodes_per_second",
        "kl",
    ):
        assert name in run.data.metrics, name
    trained = load_file(str(Path(outputs.policy) / "model.safetensors"))
    original = load_file(str(Path(llama) / "model.safetensors"))
    assert any(not torch.equal(trained[k], original[k]) for k in original), "the policy moved"

    loaded.clear()
    with_kl = config(
        beta=0.1,
        num_iterations=2,
        num_minibatches=2,
        epsilon_high=0.28,
        advantage="rloo",
        loss_aggregation="dr_grpo",
        mask_truncated_completions=True,
    )
    context = run_context.model_copy(update={"output_root": str(tmp_path / "kl")})
    grpo.run(with_kl, inputs, context)
    assert loaded == [llama, llama], "β > 0: a reference"


def history(context: RunContext, metric: str) -> list[float]:
    (run,) = child_runs(context, "grpo")
    found = mlflow.MlflowClient().get_metric_history(run.info.run_id, metric)
    return [m.value for m in sorted(found, key=lambda m: m.step)]


def test_grpo_learns_its_reward(llama: str, tmp_path: Path, run_context: RunContext) -> None:
    """Rewarded for one-character answers, the random Llama's answers shrink from ~14 characters to ~1 in
    100 steps (each 2 prompts × 4 answers)."""
    short = config(
        rewards=[{"function": "length", "options": {"target": 1}}], total_episodes=800, learning_rate=1e-2
    )
    grpo.run(short, grpo.Inputs(policy=llama, prompts=prompts_file(tmp_path)), run_context)
    reward = history(run_context, "reward")
    assert len(reward) == 100
    assert sum(reward[-10:]) / 10 > sum(reward[:10]) / 10 + 5.0, reward


def test_grpo_with_lora_keeps_one_base_that_is_also_the_reference(
    llama: str, tmp_path: Path, run_context: RunContext, loaded: list[str]
) -> None:
    with_lora = config(beta=0.05, learning_rate=5e-2, total_episodes=40, lora=Lora(rank=8, alpha=16.0))
    outputs = grpo.run(with_lora, grpo.Inputs(policy=llama, prompts=prompts_file(tmp_path)), run_context)
    assert loaded == [llama], "β > 0 under LoRA: the reference is the base, not a second model"
    assert outputs.policy_adapter is not None
    adapter = load_file(str(Path(outputs.policy_adapter) / "adapter_model.safetensors"))
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 0, "the adapters trained"
    kl = history(run_context, "kl_k3")  # in the update, against the base with the adapters off
    assert kl[0] < 1e-7, "the first update starts at the base: KL 0"
    assert max(kl[1:]) > 1e-4, kl


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    llama: str, tmp_path: Path, run_context: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(checkpoint_every=1, total_episodes=32, num_iterations=2, num_minibatches=2)
    inputs = grpo.Inputs(policy=llama, prompts=prompts_file(tmp_path))
    whole = grpo.run(
        settings, inputs, run_context.model_copy(update={"output_root": str(tmp_path / "whole")})
    )
    cut = run_context.model_copy(update={"output_root": str(tmp_path / "cut")})
    real_step = grpo_step._step
    steps: list[int] = []

    def crash_at_step_3(*args: Any) -> dict[str, float]:
        steps.append(args[-1])
        if args[-1] == 3:
            raise RuntimeError("the node went away")
        return real_step(*args)

    monkeypatch.setattr(grpo_step, "_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="the node went away"):
        grpo.run(settings, inputs, cut)
    resumed_steps: list[int] = []

    def recording(*args: Any) -> dict[str, float]:
        resumed_steps.append(args[-1])
        return real_step(*args)

    monkeypatch.setattr(grpo_step, "_step", recording)
    resumed = grpo.run(settings, inputs, cut)
    assert (steps, resumed_steps) == ([1, 2, 3], [3, 4]), "resumed after step 2's checkpoint"
    first = load_file(str(Path(whole.policy) / "model.safetensors"))
    second = load_file(str(Path(resumed.policy) / "model.safetensors"))
    assert all(torch.equal(tensor, second[key]) for key, tensor in first.items())


def test_a_reward_model_reward_scores_as_ppo_reads_it(llama: str, tmp_path: Path) -> None:
    scalar, fmt = load_scalar_model(llama)  # a head of its own, saved: the reward loads the same one
    uri = str(tmp_path / "reward-model")
    save_checkpoint(scalar, fmt, uri)
    spec = [Reward(reward_model=uri, weight=0.5)]
    (scorer,) = rewards.load(
        spec, grpo.Config(rewards=spec), torch.device("cpu"), torch.float32, "grpo.rewards"
    )
    prompts, completions = list(ANSWERS), [" lovely", " awful"]
    with torch.no_grad():
        expected = normalized_rewards(scalar, score_texts(scalar, fmt, prompts, completions))
    assert (scorer.name, scorer.weight) == ("reward_model", 0.5)
    assert torch.allclose(scorer.score(prompts, completions, {}), expected, atol=1e-6)
