"""Evaluate a candidate policy against a baseline on held-out prompts.

For each baseline (the SFT reference, and the current champion when there is one) both policies answer the
same prompts; per prompt the candidate wins (1), ties (½) or loses (0) by the reward model, by a gold judge
when one exists (the demos'), and by an LLM judge when one is configured (judge.py). Win rates carry a
bootstrap confidence interval over prompts. The judged answers are near-greedy (temperature 0.01 by default):
a policy is judged by its best answer, not by the luck of one sample. The KL to the reference is estimated on
a separate sampled pass at PPO's temperature (k1 summed over each response): the log-ratio of near-greedy
answers is not the KL PPO bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rlhf_components.core import rewards, storage
from rlhf_components.core.chat import ChatFormat, encode_prompts
from rlhf_components.core.config import SamplingConfig, StrictModel
from rlhf_components.core.generation import Batch, decode_responses, response_logprobs, sample_prompts
from rlhf_components.core.models import load_policy, load_scalar_model, normalized_rewards, score_in_batches
from rlhf_components.core.records import PromptRow, prompt_text
from rlhf_components.core.rewards import Scorer
from rlhf_components.core.runtime import seed_everything, seeded_generator, select_device
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.demo.judge import Judge, resolve_judge
from rlhf_components.evaluate import report
from rlhf_components.evaluate.config import Config, Inputs, Outputs
from rlhf_components.evaluate.judge import PairwiseJudge

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
    fmt: ChatFormat,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    config: Config,
    generator: torch.Generator,
) -> Iterator[Batch]:
    for start in range(0, len(prompt_ids), config.batch_size):
        chunk = prompt_ids[start : start + config.batch_size]
        yield sample_prompts(policy, fmt, chunk, sampling, generator)


@torch.no_grad()
def answer(
    policy: PreTrainedModel,
    fmt: ChatFormat,
    prompt_ids: list[list[int]],
    config: Config,
    generator: torch.Generator,
) -> Answers:
    answers = Answers(texts=[], lengths=[], ended=[])
    for batch in _sampled_batches(policy, fmt, prompt_ids, config.sampling, config, generator):
        answers.texts.extend(decode_responses(fmt, batch))
        answers.lengths.extend(batch.response_mask.sum(-1).tolist())
        answers.ended.extend(batch.ended_with_eos.tolist())
    return answers


@torch.no_grad()
def kl_to_reference(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    fmt: ChatFormat,
    prompt_ids: list[list[int]],
    config: Config,
    generator: torch.Generator,
) -> list[float]:
    """Σ_t log π(y_t)/π_ref(y_t) over responses sampled from π at `kl_sampling`: a k1 estimate per prompt."""
    estimates: list[float] = []
    for batch in _sampled_batches(policy, fmt, prompt_ids, config.kl_sampling, config, generator):
        ref_logprobs = response_logprobs(reference, batch, config.kl_sampling.temperature)
        estimates.extend((batch.logprobs - ref_logprobs).sum(-1).tolist())
    return estimates


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class Judged:
    answers: Answers
    rm: list[float]
    """normalised reward-model scores (empty without a reward model)"""
    gold: list[float]
    """gold-judge scores (empty without a gold judge)"""
    reward: list[float]
    """the configured rewards' weighted total (empty without evaluate.rewards)"""
    per_reward: dict[str, float]
    """each configured reward's mean"""


@dataclass
class Judges:
    """What judges the answers to the held-out prompts: the reward model, the gold judge and the configured
    rewards, each optional."""

    prompts: list[PromptRow]
    reward: tuple[PreTrainedModel, ChatFormat] | None
    gold: Judge | None
    scorers: list[Scorer]
    batch_size: int

    @torch.no_grad()
    def judge(self, answers: Answers) -> Judged:
        rm: list[float] = []
        if self.reward is not None:
            model, fmt = self.reward
            prompts = [row.prompt for row in self.prompts]
            raw = score_in_batches(model, fmt, prompts, answers.texts, self.batch_size)
            rm = normalized_rewards(model, raw).tolist()
        gold = self.gold
        scores = (
            [gold(prompt_text(p.prompt), t) for p, t in zip(self.prompts, answers.texts, strict=True)]
            if gold
            else []
        )
        total, per_reward = rewards.weighted_total(self.scorers, self.prompts, answers.texts)
        return Judged(answers, rm, scores, total.tolist() if self.scorers else [], per_reward)


def _compare(
    candidate: Judged,
    baseline: Judged,
    name: str,
    config: Config,
    generator: torch.Generator,
    llm_outcomes: list[float] | None,
) -> dict[str, float]:
    """Win rates of the candidate over one baseline, by each judge there is (reward model, gold judge, LLM
    judge), with bootstrap intervals and length-controlled variants; the baseline's own mean scores and
    length."""
    metrics: dict[str, float] = {}
    outcomes_by_judge = {
        "rm": win_rate(candidate.rm, baseline.rm) if candidate.rm else None,
        "gold": win_rate(candidate.gold, baseline.gold) if candidate.gold else None,
        "judge": llm_outcomes,
        "reward": win_rate(candidate.reward, baseline.reward) if candidate.reward else None,
    }
    for judge_name, outcomes in outcomes_by_judge.items():
        if outcomes is None:
            continue
        low, high = bootstrap_interval(outcomes, config.bootstrap_samples, config.confidence, generator)
        prefix = f"{judge_name}_win_rate" + ("" if name == "reference" else f"_vs_{name}")
        metrics[prefix] = _mean(outcomes)
        metrics[f"{prefix}_ci_low"] = low
        metrics[f"{prefix}_ci_high"] = high
        lengths = zip(candidate.answers.lengths, baseline.answers.lengths, strict=True)
        metrics[f"{prefix}_length_controlled"] = length_controlled_win_rate(
            outcomes, [float(c - b) for c, b in lengths]
        )
    metrics[f"{name}_response_length"] = _mean([float(n) for n in baseline.answers.lengths])
    if baseline.rm:
        metrics[f"{name}_rm_score"] = _mean(baseline.rm)
    if baseline.gold:
        metrics[f"{name}_gold_score"] = _mean(baseline.gold)
    if baseline.reward:
        metrics[f"{name}_reward_score"] = _mean(baseline.reward)
        metrics |= {f"{name}_reward/{reward}": mean for reward, mean in baseline.per_reward.items()}
    return metrics


def _examples(prompts: list[PromptRow], candidate: Judged, reference: Judged) -> list[dict[str, str | float]]:
    """The first eight prompts with both answers (and their reward-model scores), for the report."""
    examples: list[dict[str, str | float]] = []
    for index, prompt in enumerate(prompts[:8]):
        example: dict[str, str | float] = {
            "prompt": prompt_text(prompt.prompt),
            "candidate": candidate.answers.texts[index],
            "reference": reference.answers.texts[index],
        }
        if candidate.rm:
            example.update(candidate_rm=candidate.rm[index], reference_rm=reference.rm[index])
        examples.append(example)
    return examples


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    import mlflow

    with step_run(context, "evaluate", config):
        device = select_device(config.device, "evaluate")
        generator = seed_everything(context.seed + 1)  # bootstrap resampling, on the CPU
        answer_generator = seeded_generator(context.seed + 1, device)
        kl_generator = seeded_generator(context.seed + 2, device)  # the KL pass leaves the answers alone
        reference, fmt = load_policy(inputs.reference, config, device)
        encoded = encode_prompts(
            fmt,
            inputs.prompts,
            config.max_prompt_tokens,
            "evaluate",
            "held-out prompts to evaluate on",
            first=config.max_prompts,
        )
        prompts = [record for record, _ in encoded]
        prompt_ids = [ids for _, ids in encoded]
        reward = load_scalar_model(inputs.reward_model, config, device) if inputs.reward_model else None
        gold = resolve_judge(config.gold_judge) if config.gold_judge else None
        scorers = rewards.load(config.rewards, config, device, torch.float32, "evaluate.rewards")
        judges = Judges(prompts, reward, gold, scorers, config.batch_size)
        models = {
            uri: load_policy(uri, config, device)[0]
            for uri in {inputs.candidate, inputs.champion} - {None, inputs.reference}
        }
        models[inputs.reference] = reference  # loaded once: it answers and anchors the KL
        for model in [*models.values(), *([reward[0]] if reward else [])]:
            model.eval()
        candidate_model = models[inputs.candidate]
        candidate = judges.judge(answer(candidate_model, fmt, prompt_ids, config, answer_generator))
        kl = kl_to_reference(candidate_model, reference, fmt, prompt_ids, config, kl_generator)
        metrics: dict[str, float] = {
            "kl": _mean(kl),
            "response_length": _mean([float(n) for n in candidate.answers.lengths]),
            "eos_rate": _mean([float(e) for e in candidate.answers.ended]),
            "distinct_1": distinct_n(candidate.answers.texts, 1),
            "distinct_2": distinct_n(candidate.answers.texts, 2),
        }
        if candidate.rm:
            metrics["rm_score"] = _mean(candidate.rm)
        if candidate.gold:
            metrics["gold_score"] = _mean(candidate.gold)
        if candidate.reward:
            metrics["reward_score"] = _mean(candidate.reward)
            metrics |= {f"reward/{name}": mean for name, mean in candidate.per_reward.items()}
        baselines = {"reference": inputs.reference}
        if inputs.champion and inputs.champion != inputs.reference:
            baselines["champion"] = inputs.champion
        judged = {
            name: judges.judge(answer(models[uri], fmt, prompt_ids, config, answer_generator))
            for name, uri in baselines.items()
        }
        llm_outcomes: dict[str, list[float]] = {}
        if config.judge is not None:
            llm = PairwiseJudge.open(config.judge, step_output(context, "evaluate", "judge_cache.jsonl"))
            texts = [prompt_text(p.prompt) for p in prompts]
            llm_outcomes = llm.compare(
                {name: (texts, candidate.answers.texts, b.answers.texts) for name, b in judged.items()}
            )
            metrics["judge_requests"] = float(llm.requests)
            metrics["judge_unparsed_fraction"] = llm.unparsed / max(1, llm.verdicts_read)
        for name, baseline in judged.items():
            metrics |= _compare(candidate, baseline, name, config, generator, llm_outcomes.get(name))
        log_metrics(metrics)
        examples = _examples(prompts, candidate, judged["reference"])
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
        reference = judged["reference"]
        score_name = "reward-model score (normalised)" if candidate.rm else "gold judge score"
        trainer, history = _trainer_history(context)
        page = report.render(
            metrics,
            examples,
            (candidate.rm or candidate.gold, reference.rm or reference.gold),
            (candidate.answers.lengths, reference.answers.lengths),
            score_name,
            history,
            trainer,
        )
        mlflow.log_text(page, "evaluation/report.html")
        page_uri = step_output(context, "evaluate", "report.html")
        storage.write_text(page_uri, page)
        log.info("evaluate: %s", {k: round(v, 4) for k, v in metrics.items()})
        return Outputs(report=report_uri, report_html=page_uri, metrics=metrics)


TRAINERS = ("ppo", "dpo", "grpo")


def _trainer_history(context: RunContext) -> tuple[str | None, dict[str, list[tuple[int, float]]]]:
    """The step that trained the candidate in this pipeline run, and its metrics' histories from MLflow."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(context.parent_run_id)
    trained = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{context.parent_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in trained:
        step = run.data.tags.get("rlhf.step")
        if step in TRAINERS:
            return step, {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                for key in run.data.metrics
            }
    return None, {}
