"""Rewards from Python functions (built-in or `module:function`), reward models and scoring endpoints,
weighted into one: what GRPO trains on, and what evaluate scores held-out answers with.

A function is called as f(prompts, completions, columns, **options), with the prompts (text or
conversations), the completions' text and the prompt rows' other fields (column name → one value per
completion), and returns one float per completion. A reward model scores each completion as PPO reads it
(normalised; the text re-encoded its way); so does a `url` served by `rlhf serve-reward-model` (or any
endpoint with its JSON contract). Every reward is logged as reward/<name>, and the total is
Σ weight · reward.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import TypeAdapter

from rlhf_components.core.config import ModelStep, Reward
from rlhf_components.core.errors import UserError
from rlhf_components.core.http import post_json
from rlhf_components.core.models import load_scalar_model, normalized_rewards, score_in_batches
from rlhf_components.core.records import Prompt, PromptRow

Columns = dict[str, list[Any]]
_PROMPTS: TypeAdapter[list[Prompt]] = TypeAdapter(list[Prompt])
RewardFunction = Callable[..., Sequence[float]]


def exact_match(
    prompts: Sequence[Prompt], completions: Sequence[str], columns: Columns, field: str = "answer"
) -> list[float]:
    """1 where the completion, stripped, is the row's `field` (as text), else 0."""
    if field not in columns:
        raise UserError(f"exact_match: the prompts have no {field!r} field (give it as options.field)")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, columns[field], strict=True)]


def regex(
    prompts: Sequence[Prompt], completions: Sequence[str], columns: Columns, pattern: str = ""
) -> list[float]:
    """1 where the whole completion, stripped, matches `pattern`, else 0 (a format reward)."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length(
    prompts: Sequence[Prompt], completions: Sequence[str], columns: Columns, target: int = 100
) -> list[float]:
    """−|characters − target| / target: 0 at the target length, lower the further from it."""
    return [-abs(len(c) - target) / target for c in completions]


BUILT_IN: dict[str, RewardFunction] = {"exact_match": exact_match, "regex": regex, "length": length}


@dataclass
class Scorer:
    """One configured reward, ready to score."""

    name: str
    weight: float
    score: Callable[[Sequence[Prompt], Sequence[str], Columns], torch.Tensor]


def weighted_total(
    scorers: list[Scorer], rows: Sequence[PromptRow], completions: Sequence[str]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ weight · reward per completion (`rows[i]` is the prompt row `completions[i]` answers, its columns
    what functions read), and each reward's mean by name."""
    names = sorted({name for row in rows for name in row.columns})
    columns = {name: [row.columns.get(name) for row in rows] for name in names}
    prompts = [row.prompt for row in rows]
    total = torch.zeros(len(completions))
    means = {}
    for scorer in scorers:
        values = scorer.score(prompts, completions, columns)
        means[scorer.name] = values.mean().item()
        total += scorer.weight * values
    return total, means


def load(
    rewards: list[Reward], step: ModelStep, device: torch.device, dtype: torch.dtype, section: str
) -> list[Scorer]:
    """Scorers for `rewards`, the config list at `section` (e.g. grpo.rewards), which errors name."""
    scorers = []
    for index, reward in enumerate(rewards):
        where = f"{section}[{index}]"
        if reward.reward_model is not None:
            score = _model_scorer(reward.reward_model, step, device, dtype, reward.batch_size)
        elif reward.url is not None:
            score = _http_scorer(reward, where)
        else:
            assert reward.function is not None
            function = BUILT_IN.get(reward.function) or _import(reward.function, where)
            score = _function_scorer(function, reward.options, where)
        scorers.append(Scorer(reward.label, reward.weight, score))
    names = [scorer.name for scorer in scorers]
    if len(set(names)) < len(names):
        raise UserError(f"{section}: two rewards are named alike ({names}); give each a name")
    return scorers


def _import(path: str, where: str) -> RewardFunction:
    module_name, _, attribute = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserError(f"{where}.function: cannot import {path}: {error}") from None
    if not callable(function):
        raise UserError(f"{where}.function: {path} is not callable")
    return function


def _function_scorer(
    function: RewardFunction, options: dict[str, Any], where: str
) -> Callable[[Sequence[Prompt], Sequence[str], Columns], torch.Tensor]:
    def score(prompts: Sequence[Prompt], completions: Sequence[str], columns: Columns) -> torch.Tensor:
        try:
            values = [float(v) for v in function(prompts, completions, columns, **options)]
        except TypeError as error:
            raise UserError(f"{where}: the reward function failed: {error}") from None
        if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
            raise UserError(
                f"{where}: the reward function must return one finite number per completion "
                f"({len(completions)}); it returned {len(values)}"
            )
        return torch.tensor(values)

    return score


def _model_scorer(
    uri: str, step: ModelStep, device: torch.device, dtype: torch.dtype, batch_size: int
) -> Callable[[Sequence[Prompt], Sequence[str], Columns], torch.Tensor]:
    model, fmt = load_scalar_model(uri, step, device, dtype=dtype)
    model.eval().requires_grad_(False)

    @torch.no_grad()
    def score(prompts: Sequence[Prompt], completions: Sequence[str], columns: Columns) -> torch.Tensor:
        raw = score_in_batches(model, fmt, prompts, completions, batch_size)
        return normalized_rewards(model, raw).float()

    return score


def _http_scorer(
    reward: Reward, where: str
) -> Callable[[Sequence[Prompt], Sequence[str], Columns], torch.Tensor]:
    """Scores from an endpoint (rlhf serve-reward-model's contract), `batch_size` completions a request,
    retried as core.http does."""
    assert reward.url is not None
    url = reward.url

    def post(prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        answer = post_json(
            url,
            {"prompts": _PROMPTS.dump_python(list(prompts)), "responses": list(completions)},
            where=where,
            timeout_s=reward.timeout_s,
            retries=reward.retries,
        )
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(completions):
            raise UserError(f"{where}: {url} did not answer one score per completion ({len(completions)})")
        return [float(score) for score in scores]

    def score(prompts: Sequence[Prompt], completions: Sequence[str], columns: Columns) -> torch.Tensor:
        values: list[float] = []
        for start in range(0, len(completions), reward.batch_size):
            end = start + reward.batch_size
            values += post(prompts[start:end], completions[start:end])
        return torch.tensor(values)

    return score
