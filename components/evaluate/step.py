"""Evaluate a candidate policy against a baseline on held-out prompts.

For each baseline (the SFT reference, and the current champion when there is one) both policies answer the
same prompts; per prompt the candidate wins (1), ties (½) or loses (0) by the reward model and, when a gold
judge exists (the demo's), by the gold judge. Win rates carry a bootstrap confidence interval over prompts.
The judged answers are near-greedy (temperature 0.01 by default): a policy is judged by its best answer,
not by the luck of one sample. The KL to the reference is estimated on a separate sampled pass at PPO's
temperature (k1 summed over each response): the log-ratio of near-greedy answers is not the KL PPO bounded.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_components.core import storage
from rlhf_components.core.config import SamplingConfig, StrictModel
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import (
    Batch,
    decode_responses,
    response_logprobs,
    sample_prompts,
)
from rlhf_components.core.models import load_policy, load_scalar_model, normalized_rewards, score_texts
from rlhf_components.core.records import read_prompts
from rlhf_components.core.runtime import seed_everything, seeded_generator, select_device
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.demo.judge import resolve_judge
from rlhf_components.evaluate.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)


class Answers(StrictModel):
    texts: list[str]
    lengths: list[int]
    ended: list[bool]


def win_rate(candidate: list[float], baseline: list[float]) -> list[float]:
    return [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True)]


def length_controlled_win_rate(outcomes: list[float], length_difference: list[float]) -> float:
    """The win rate a judge would give at equal answer lengths.

    Fits P(win) = σ(a + b·Δ) by maximum likelihood (Newton's method, ties as ½), Δ = the length difference
    in units of its standard deviation, and returns σ(a): wins bought by longer answers do not count.
    """
    y = torch.tensor(outcomes, dtype=torch.float64)
    delta = torch.tensor(length_difference, dtype=torch.float64)
    scale = (
        delta.std()
        if len(outcomes) > 1 and float(delta.std()) > 0
        else torch.tensor(1.0, dtype=torch.float64)
    )
    features = torch.stack([torch.ones_like(delta), delta / scale], dim=1)
    weights = torch.zeros(2, dtype=torch.float64)
    ridge = 1e-3 * torch.eye(2, dtype=torch.float64)  # keeps the fit finite when one side always wins
    for _ in range(50):
        p = torch.sigmoid(features @ weights)
        gradient = features.T @ (p - y) + ridge @ weights
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + ridge
        step = torch.linalg.solve(hessian, gradient)
        weights = weights - step
        if float(step.abs().max()) < 1e-10:
            break
    return float(torch.sigmoid(weights[0]))


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of all answers (whitespace words): 1.0 = no repetition at all."""
    grams = [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def bootstrap_interval(
    outcomes: list[float], samples: int, confidence: float, generator: torch.Generator
) -> tuple[float, float]:
    values = torch.tensor(outcomes, dtype=torch.float64)
    draws = torch.randint(0, len(outcomes), (samples, len(outcomes)), generator=generator)
    means = values[draws].mean(dim=1)
    tail = (1.0 - confidence) / 2
    return float(torch.quantile(means, tail)), float(torch.quantile(means, 1.0 - tail))


def _sampled_batches(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingConfig,
    config: Config,
    generator: torch.Generator,
) -> Iterator[Batch]:
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        yield sample_prompts(policy, tokenizer, chunk, sampling, config.max_prompt_tokens, generator)


@torch.no_grad()
def answer(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: Config,
    generator: torch.Generator,
) -> Answers:
    answers = Answers(texts=[], lengths=[], ended=[])
    for batch in _sampled_batches(policy, tokenizer, prompts, config.sampling, config, generator):
        answers.texts.extend(decode_responses(tokenizer, batch))
        answers.lengths.extend(batch.response_mask.sum(-1).tolist())
        answers.ended.extend(batch.ended_with_eos.tolist())
    return answers


@torch.no_grad()
def kl_to_reference(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: Config,
    generator: torch.Generator,
) -> list[float]:
    """Σ_t log π(y_t)/π_ref(y_t) over responses sampled from π at `kl_sampling`: a k1 estimate per prompt."""
    estimates: list[float] = []
    for batch in _sampled_batches(policy, tokenizer, prompts, config.kl_sampling, config, generator):
        ref_logprobs = response_logprobs(reference, batch, config.kl_sampling.temperature)
        estimates.extend((batch.logprobs - ref_logprobs).sum(-1).tolist())
    return estimates


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "evaluate", config):
        device = select_device(config.device, "evaluate")
        generator = seed_everything(context.seed + 1)  # bootstrap resampling, on the CPU
        answer_generator = seeded_generator(context.seed + 1, device)
        kl_generator = seeded_generator(context.seed + 2, device)  # the KL pass leaves the answers alone
        prompts = [record.prompt for record in read_prompts(inputs.prompts)]
        prompts = prompts[: config.max_prompts]
        if not prompts:
            raise UserError(f"{inputs.prompts}: no held-out prompts to evaluate on")
        reward = (
            load_scalar_model(inputs.reward_model, config.trust_remote_code, device)
            if inputs.reward_model
            else None
        )
        if reward is not None:
            reward[0].eval()
        judge = resolve_judge(config.gold_judge) if config.gold_judge else None
        reference, tokenizer = load_policy(inputs.reference, config.trust_remote_code, device)
        reference.eval()

        def rm_scores(texts: list[str]) -> list[float]:
            if reward is None:
                return []
            reward_model, reward_tokenizer = reward
            with torch.no_grad():
                raw = torch.cat(
                    [
                        score_texts(
                            reward_model,
                            reward_tokenizer,
                            prompts[i : i + config.batch_size],
                            texts[i : i + config.batch_size],
                            config.max_reward_tokens,
                        )
                        for i in range(0, len(texts), config.batch_size)
                    ]
                )
            return normalized_rewards(reward_model, raw).tolist()

        def load(uri: str) -> PreTrainedModel:
            # The reference is already loaded for the KL: no second copy.
            if uri == inputs.reference:
                return reference
            return load_policy(uri, config.trust_remote_code, device)[0].eval()

        def judged_answers(model: PreTrainedModel) -> tuple[Answers, list[float], list[float]]:
            answers = answer(model, tokenizer, prompts, config, answer_generator)
            gold = [judge(p, t) for p, t in zip(prompts, answers.texts, strict=True)] if judge else []
            return answers, rm_scores(answers.texts), gold

        candidate_model = load(inputs.candidate)
        candidate, candidate_rm, candidate_gold = judged_answers(candidate_model)
        metrics: dict[str, float] = {
            "kl": _mean(
                kl_to_reference(candidate_model, reference, tokenizer, prompts, config, kl_generator)
            ),
            "response_length": _mean([float(n) for n in candidate.lengths]),
            "eos_rate": _mean([float(e) for e in candidate.ended]),
            "distinct_1": distinct_n(candidate.texts, 1),
            "distinct_2": distinct_n(candidate.texts, 2),
        }
        if candidate_rm:
            metrics["rm_score"] = _mean(candidate_rm)
        if candidate_gold:
            metrics["gold_score"] = _mean(candidate_gold)
        baselines = {"reference": inputs.reference}
        if inputs.champion and inputs.champion != inputs.reference:
            baselines["champion"] = inputs.champion
        examples: list[dict[str, str | float]] = []
        reference_scores: list[float] = []
        for name, uri in baselines.items():
            baseline, baseline_rm, baseline_gold = judged_answers(load(uri))
            comparisons = {"rm": (candidate_rm, baseline_rm), "gold": (candidate_gold, baseline_gold)}
            for judge_name, (ours, theirs) in comparisons.items():
                if not ours:
                    continue
                outcomes = win_rate(ours, theirs)
                low, high = bootstrap_interval(
                    outcomes, config.bootstrap_samples, config.confidence, generator
                )
                prefix = f"{judge_name}_win_rate" + ("" if name == "reference" else f"_vs_{name}")
                metrics[prefix] = _mean(outcomes)
                metrics[f"{prefix}_ci_low"] = low
                metrics[f"{prefix}_ci_high"] = high
                length_gap = [float(c - b) for c, b in zip(candidate.lengths, baseline.lengths, strict=True)]
                metrics[f"{prefix}_length_controlled"] = length_controlled_win_rate(outcomes, length_gap)
            metrics[f"{name}_response_length"] = _mean([float(n) for n in baseline.lengths])
            if baseline_rm:
                metrics[f"{name}_rm_score"] = _mean(baseline_rm)
            if baseline_gold:
                metrics[f"{name}_gold_score"] = _mean(baseline_gold)
            if name == "reference":
                examples = [
                    {"prompt": p, "candidate": c, "reference": r}
                    for p, c, r in zip(prompts[:8], candidate.texts, baseline.texts, strict=False)
                ]
                for example, cs, rs in zip(examples, candidate_rm, baseline_rm, strict=False):
                    example.update(candidate_rm=cs, reference_rm=rs)
                reference_scores = baseline_rm or baseline_gold
        log_metrics(metrics)
        report_uri = step_output(context, "evaluate", "report.json")
        storage.write_json(
            report_uri,
            {
                "metrics": metrics,
                "examples": examples,
                "num_prompts": len(prompts),
                "gold_judge": config.gold_judge,
            },
        )
        score_name = "reward-model score (normalised)" if candidate_rm else "gold judge score"
        _log_report(metrics, examples, candidate_rm or candidate_gold, reference_scores, score_name)
        log.info("evaluate: %s", {k: round(v, 4) for k, v in metrics.items()})
        return Outputs(report=report_uri, metrics=metrics)


def _log_report(
    metrics: dict[str, float],
    examples: list[dict[str, str | float]],
    candidate_scores: list[float],
    reference_scores: list[float],
    score_name: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    with tempfile.TemporaryDirectory() as temp:
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.hist(reference_scores, bins=20, alpha=0.6, label="reference (SFT)")
        axis.hist(candidate_scores, bins=20, alpha=0.6, label="candidate")
        axis.set_xlabel(score_name)
        axis.set_ylabel("responses")
        axis.legend()
        figure.tight_layout()
        plot = Path(temp, "reward_distribution.png")
        figure.savefig(plot, dpi=100)
        plt.close(figure)
        lines = ["# Evaluation report", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())]
        lines += ["", "![reward distribution](reward_distribution.png)", "", "## Examples", ""]
        for example in examples:
            lines += [
                f"- **prompt**: {example['prompt']}",
                f"  - candidate: {example['candidate']}",
                f"  - reference: {example['reference']}",
            ]
        report = Path(temp, "report.md")
        report.write_text("\n".join(lines) + "\n", encoding="utf-8")
        mlflow.log_artifacts(temp, artifact_path="evaluation")
