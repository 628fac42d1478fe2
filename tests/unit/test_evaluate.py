"""evaluate: win rate, bootstrap interval, and a full run of the SFT policy against itself."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from rlhf_components import evaluate
from rlhf_components.core.config import SamplingConfig
from rlhf_components.core.errors import UserError
from rlhf_components.core.models import load_policy, save_checkpoint
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import GOLD_JUDGE_NAME, DemoAssets
from rlhf_components.evaluate.step import answer, bootstrap_interval, win_rate

from ._helpers import child_runs, read_jsonl, tiny_reward_model, write_jsonl


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def test_win_rate_scores_each_prompt() -> None:
    assert win_rate([3.0, 1.0, 2.0, -1.0], [1.0, 1.0, 5.0, -2.0]) == [1.0, 0.5, 0.0, 1.0]
    assert win_rate([], []) == []
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])


def test_bootstrap_interval() -> None:
    outcomes = [1.0] * 30 + [0.5] * 10 + [0.0] * 20
    mean = sum(outcomes) / len(outcomes)
    low, high = bootstrap_interval(outcomes, 2000, 0.95, _generator(0))
    assert low < mean < high
    assert low >= 0.0 and high <= 1.0
    # Deterministic for a seeded generator; another seed moves the ends only a little.
    assert bootstrap_interval(outcomes, 2000, 0.95, _generator(0)) == (low, high)
    assert bootstrap_interval(outcomes, 2000, 0.95, _generator(1)) == pytest.approx((low, high), abs=0.03)
    # Against the normal approximation by hand: mean ± 1.96 · sd / √n.
    sd = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / len(outcomes))
    half_width = 1.959964 * sd / math.sqrt(len(outcomes))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.02)
    # More samples, narrower interval (≈ 1/√n: 10× the prompts, ~3.2× narrower).
    low_many, high_many = bootstrap_interval(outcomes * 10, 2000, 0.95, _generator(0))
    assert low_many < mean < high_many
    assert (high_many - low_many) == pytest.approx((high - low) / math.sqrt(10), rel=0.2)
    # A lower confidence gives a narrower interval; unanimous outcomes give a point.
    low_80, high_80 = bootstrap_interval(outcomes, 2000, 0.8, _generator(0))
    assert high_80 - low_80 < high - low
    assert bootstrap_interval([1.0] * 12, 500, 0.95, _generator(0)) == (1.0, 1.0)
    assert bootstrap_interval([0.5] * 12, 500, 0.95, _generator(0)) == (0.5, 0.5)


@pytest.fixture
def eval_prompts(tmp_path: Path, tiny_assets: DemoAssets) -> Path:
    """collect_prompts' eval split shape: {id, prompt}."""
    rows = read_jsonl(tiny_assets.prompts_file)[:40]
    return write_jsonl(tmp_path / "eval.jsonl", [{"id": f"e{i}", **row} for i, row in enumerate(rows)])


def _config(**overrides: object) -> evaluate.Config:
    return evaluate.Config.model_validate(
        {
            "max_prompts": 40,
            "sampling": SamplingConfig(max_new_tokens=16, temperature=0.7),
            "batch_size": 16,
            "bootstrap_samples": 200,
            "gold_judge": GOLD_JUDGE_NAME,
            **overrides,
        }
    )


def test_policy_against_itself(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_assets: DemoAssets,
    eval_prompts: Path,
    run_context: RunContext,
) -> None:
    reward_model = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    # The champion is the same weights under another path, so both baselines are exercised.
    champion = tmp_path / "champion"
    shutil.copytree(tiny_assets.sft_model_dir, champion)
    inputs = evaluate.Inputs(
        candidate=tiny_assets.sft_model_dir,
        reference=tiny_assets.sft_model_dir,
        champion=str(champion),
        reward_model=reward_model,
        prompts=str(eval_prompts),
    )
    outputs = evaluate.run(_config(), inputs, run_context)
    metrics = outputs.metrics

    assert 0.25 <= metrics["gold_win_rate"] <= 0.75
    assert 0.25 <= metrics["rm_win_rate"] <= 0.75
    # candidate == reference: the log-probs from sampling match the reference's full forward pass.
    assert abs(metrics["kl"]) < 0.05
    for prefix in ("rm_win_rate", "gold_win_rate", "rm_win_rate_vs_champion", "gold_win_rate_vs_champion"):
        assert metrics[f"{prefix}_ci_low"] <= metrics[prefix] <= metrics[f"{prefix}_ci_high"], prefix
        assert metrics[f"{prefix}_ci_low"] >= 0.0 and metrics[f"{prefix}_ci_high"] <= 1.0
    assert 0.0 <= metrics["eos_rate"] <= 1.0
    assert 1.0 <= metrics["response_length"] <= 16.0
    assert -1.0 <= metrics["gold_score"] <= 1.0
    expected = {
        "reference_rm_score",
        "reference_gold_score",
        "champion_rm_score",
        "champion_gold_score",
        "reference_response_length",
    }
    assert expected <= set(metrics)

    report = json.loads(Path(outputs.report).read_text(encoding="utf-8"))
    assert report["metrics"] == metrics
    assert report["num_prompts"] == 40
    assert report["gold_judge"] == GOLD_JUDGE_NAME
    assert len(report["examples"]) == 8
    assert {"prompt", "candidate", "reference", "candidate_rm", "reference_rm"} <= set(report["examples"][0])

    [run] = child_runs(run_context, "evaluate")
    assert run.data.metrics["gold_win_rate"] == pytest.approx(metrics["gold_win_rate"])
    assert run.data.metrics["kl"] == pytest.approx(metrics["kl"])
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/report.html"}
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="evaluation", dst_path=str(tmp_path / "download")
        )
    )
    page = (local / "report.html").read_text(encoding="utf-8")
    assert page == Path(outputs.report_html).read_text(encoding="utf-8")  # the KFP HTML artifact's source
    assert "<td>gold_win_rate</td>" in page and "Win rates (95% bootstrap intervals)" in page
    # No trainer ran in this pipeline run: the page says so rather than plotting nothing.
    assert "No training run of this pipeline run was found." in page


def test_rerun_is_reproducible(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_assets: DemoAssets,
    eval_prompts: Path,
    run_context: RunContext,
) -> None:
    reward_model = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    inputs = evaluate.Inputs(
        candidate=tiny_assets.sft_model_dir,
        reference=tiny_assets.sft_model_dir,
        reward_model=reward_model,
        prompts=str(eval_prompts),
    )
    config = _config(max_prompts=8, gold_judge=None)
    first = evaluate.run(config, inputs, run_context)
    again = evaluate.run(config, inputs, run_context)
    assert first.metrics == again.metrics
    assert not any(key.startswith("gold") or "vs_champion" in key for key in first.metrics)
    assert len(child_runs(run_context, "evaluate")) == 2


def test_no_prompts_is_a_user_error(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    inputs = evaluate.Inputs(
        candidate=tiny_assets.sft_model_dir,
        reference=tiny_assets.sft_model_dir,
        reward_model=tiny_assets.sft_model_dir,
        prompts=str(empty),
    )
    with pytest.raises(UserError, match="no held-out prompts"):
        evaluate.run(_config(), inputs, run_context)


def test_answers_are_near_greedy_and_kl_comes_from_its_own_sampled_pass(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_assets: DemoAssets,
    eval_prompts: Path,
    run_context: RunContext,
) -> None:
    defaults = evaluate.Config()
    assert defaults.sampling.temperature <= 0.01 and defaults.kl_sampling.temperature == 0.7
    reward_model = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    near_greedy = SamplingConfig(max_new_tokens=16, temperature=defaults.sampling.temperature)

    # Near-greedy answers are mostly the greedy answers (the demo grammar's word choices are near-ties, so not
    # all); answers sampled at PPO's temperature almost never are.
    policy, fmt = load_policy(tiny_assets.sft_model_dir)
    prompts = [fmt.prompt_ids(row["prompt"]) for row in read_jsonl(eval_prompts)]

    def answers(sampling: SamplingConfig) -> list[str]:
        config = _config(sampling=sampling)
        return answer(policy, fmt, prompts, config, torch.Generator().manual_seed(0)).texts

    greedy = answers(near_greedy.model_copy(update={"greedy": True}))
    agreement = [
        sum(a == g for a, g in zip(answers(s), greedy, strict=True)) / len(greedy)
        for s in (near_greedy, defaults.kl_sampling.model_copy(update={"max_new_tokens": 16}))
    ]
    assert agreement[0] >= 0.5 and agreement[1] <= 0.2, agreement

    itself = evaluate.Inputs(
        candidate=tiny_assets.sft_model_dir,
        reference=tiny_assets.sft_model_dir,
        reward_model=reward_model,
        prompts=str(eval_prompts),
    )
    # A different policy: the KL depends on the KL pass's temperature and the judged answers do not.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_checkpoint(policy, fmt, str(tmp_path / "perturbed"))
    perturbed = itself.model_copy(update={"candidate": str(tmp_path / "perturbed")})
    kl_passes = [near_greedy.model_copy(update={"temperature": t}) for t in (0.7, 1.0)]
    at_07, at_10 = (
        evaluate.run(_config(sampling=near_greedy, kl_sampling=kl), perturbed, run_context).metrics
        for kl in kl_passes
    )
    assert at_07["kl"] > 0.1 and at_10["kl"] > 0.1 and at_07["kl"] != at_10["kl"]
    assert {k: v for k, v in at_07.items() if k != "kl"} == {k: v for k, v in at_10.items() if k != "kl"}


def row_weight(prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]) -> list[float]:
    """The row's own `weight`, or −100 when the columns are not the prompt's (`echo` repeats the prompt)."""
    rows = zip(prompts, columns["weight"], columns["echo"], strict=True)
    return [weight if prompt == echo else -100.0 for prompt, weight, echo in rows]


def test_the_evaluations_rewards_score_each_policys_answers_with_their_rows_columns(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    rows = read_jsonl(tiny_assets.prompts_file)[:12]
    weights = [float(i) / 4 for i in range(len(rows))]
    table = [
        {"prompt": r["prompt"], "echo": r["prompt"], "weight": w, "answer": "no review says this"}
        for r, w in zip(rows, weights, strict=True)
    ]
    prompts = write_jsonl(tmp_path / "eval.jsonl", table)
    config = _config(
        max_prompts=12,
        rewards=[
            {"function": f"{__name__}:row_weight", "weight": 2.0},
            {"function": "exact_match", "weight": 5.0},
        ],
    )
    inputs = evaluate.Inputs(
        candidate=tiny_assets.sft_model_dir, reference=tiny_assets.sft_model_dir, prompts=str(prompts)
    )
    metrics = evaluate.run(config, inputs, run_context).metrics
    assert metrics["reward/row_weight"] == pytest.approx(sum(weights) / len(weights))
    assert metrics["reward/exact_match"] == 0.0
    assert metrics["reward_score"] == pytest.approx(2.0 * sum(weights) / len(weights))
    # The candidate is the reference: every answer scores alike, every prompt is a tie.
    assert metrics["reference_reward_score"] == metrics["reward_score"]
    assert metrics["reward_win_rate"] == 0.5
    assert metrics["reward_win_rate_ci_low"] == metrics["reward_win_rate_ci_high"] == 0.5
