"""GRPO and RLOO: critic-free online RL, top to bottom in one file.

No value model: each prompt is answered K times (one group) and an answer's advantage is its reward against
its group's (core.losses.group_advantages: GRPO's group mean, optionally ÷ group std; RLOO's leave-one-out
mean). Rewards are Python functions, reward models and endpoints, weighted (core.rewards). Each step:

1. rollout — this worker's share of `prompts_per_step` prompts (whole groups), each sampled K times;
2. rewards — every reward of every completion, the weighted total, minus β·Σ log π/π_ref when the KL is in
             the reward; advantages per group;
3. optimise — `num_iterations` (μ) passes × `num_minibatches` optimizer steps of the clipped surrogate
             (ε below, ε_high above) per token, plus β·k3(π, π_ref) per token when the KL is in the loss,
             aggregated per `loss_aggregation` (token, sequence, dr_grpo). With μ = 1 the old log-probs are
             the current ones, detached (ratio 1 exactly); with μ > 1 those of the generation pass.
             Completions that never ended contribute nothing with `mask_truncated_completions`.

A reward model trained upstream (the grpo-feedback pipeline) is one more reward. With β = 0 no reference
model is loaded; under LoRA (core.lora) the reference is the policy with its adapters disabled. Optimizer,
schedule, workers and checkpoints are the trainer kernel's (core.trainer).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from rlhf_components.core import rewards as reward_functions
from rlhf_components.core.chat import ChatFormat, PromptStream, encode_prompts
from rlhf_components.core.config import Reward
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import (
    Batch,
    decode_responses,
    response_logits,
    response_logprobs,
    sample,
)
from rlhf_components.core.lora import adapters_disabled, add_adapters, save_policy
from rlhf_components.core.losses import (
    aggregate_loss,
    clipped_token_loss,
    entropy,
    group_advantages,
    kl_per_token,
    masked_mean,
)
from rlhf_components.core.models import load_policy
from rlhf_components.core.records import PromptRow
from rlhf_components.core.runtime import sampling_generator
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, step_run
from rlhf_components.core.trainer import Job, Kernel, Resumed, policy_outputs, start_training, units
from rlhf_components.grpo.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

STEP = "grpo"


@dataclass
class Group:
    """A step's completions: K consecutive rows per prompt."""

    batch: Batch
    rewards: torch.Tensor
    """the weighted total per completion, [N]"""
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None
    per_reward: dict[str, float]
    kl: float


@dataclass
class Models:
    policy: PreTrainedModel
    reference: PreTrainedModel | None
    """None when β = 0"""
    fmt: ChatFormat
    scorers: list[reward_functions.Scorer]


def _load_models(inputs: Inputs, config: Config, job: Job) -> Models:
    policy, fmt = load_policy(
        inputs.policy, config, job.device, dtype=job.dtype if config.lora else torch.float32
    )
    reference: PreTrainedModel | None = None
    if config.beta > 0:
        if config.lora is not None and inputs.reference in (None, inputs.policy):
            reference = policy
        else:
            reference = load_policy(inputs.reference or inputs.policy, config, job.device, dtype=job.dtype)[0]
            reference.eval().requires_grad_(False)
    if config.lora:
        add_adapters(policy, config.lora, STEP)
    policy.eval()
    trained = (
        [
            Reward(
                reward_model=inputs.reward_model,
                weight=config.trained_reward_model_weight,
                name="trained_reward_model",
            )
        ]
        if inputs.reward_model
        else []
    )
    if not config.rewards + trained:
        raise UserError("grpo.rewards: no rewards to train on; name at least one")
    scorers = reward_functions.load(config.rewards + trained, config, job.device, job.dtype, "grpo.rewards")
    return Models(policy, reference, fmt, scorers)


@torch.no_grad()
def collect_group(
    models: Models,
    prompts: list[PromptRow],
    ids: list[list[int]],
    config: Config,
    generator: torch.Generator,
) -> Group:
    """K completions of each prompt, their rewards and advantages."""
    k = config.num_generations
    device = models.policy.device
    query_ids, query_mask = (t.to(device).repeat_interleave(k, dim=0) for t in models.fmt.left_padded(ids))
    batch = sample(models.policy, query_ids, query_mask, config.sampling, models.fmt, generator)
    completions = decode_responses(models.fmt, batch)
    repeated = [record for record in prompts for _ in range(k)]
    total, means = reward_functions.weighted_total(models.scorers, repeated, completions)
    per_reward = {f"reward/{name}": mean for name, mean in means.items()}
    total = total.to(device)
    mask = batch.response_mask.float()
    ref_logprobs, kl = None, 0.0
    if models.reference is not None:
        with adapters_disabled(models.reference):
            ref_logprobs = response_logprobs(models.reference, batch, config.sampling.temperature)
        log_ratio = (kl_per_token(batch.logprobs, ref_logprobs, "k1") * mask).sum(-1)
        kl = log_ratio.mean().item()
        if config.kl_in == "reward":
            total = total - config.beta * log_ratio
    advantages = group_advantages(total, k, config.advantage, config.scale_rewards)
    return Group(batch, total, advantages, ref_logprobs, per_reward, kl)


def grpo_update(
    models: Models, kernel: Kernel, group: Group, config: Config, data_order: torch.Generator
) -> dict[str, float]:
    """μ passes × minibatches over this worker's completions; returns the training statistics."""
    policy = models.policy
    rows_total = group.batch.response_ids.shape[0]
    minibatch = rows_total // config.num_minibatches
    stats: dict[str, list[float]] = {}
    policy.train()
    for _ in range(config.num_iterations):
        order = torch.randperm(rows_total, generator=data_order, device=data_order.device)
        for start in range(0, rows_total, minibatch):
            rows = order[start : start + minibatch]
            micro = group.batch.rows(rows)
            mask = micro.response_mask.float()
            if config.mask_truncated_completions:
                mask = mask * micro.ended_with_eos.float()[:, None]
            log_probs = response_logits(policy, micro, config.sampling.temperature).log_softmax(-1)
            logprobs = log_probs.gather(-1, micro.response_ids[..., None]).squeeze(-1)
            old = logprobs.detach() if config.num_iterations == 1 else micro.logprobs
            per_token, ratio = clipped_token_loss(
                logprobs, old, group.advantages[rows], config.epsilon, config.epsilon_above
            )
            kl = torch.zeros_like(per_token)
            if group.ref_logprobs is not None:
                kl = kl_per_token(logprobs, group.ref_logprobs[rows, : mask.shape[1]], "k3")
                if config.kl_in == "loss":
                    per_token = per_token + config.beta * kl
            kernel.step(
                aggregate_loss(per_token, mask, config.loss_aggregation, config.sampling.max_new_tokens)
            )
            with torch.no_grad():
                advantage = group.advantages[rows][:, None]
                low = (ratio < 1 - config.epsilon) & (advantage < 0)
                high = (ratio > 1 + config.epsilon_above) & (advantage > 0)
                micro_stats = {
                    "ratio_mean": masked_mean(ratio, mask),
                    "clip_low_fraction": masked_mean(low.float(), mask),
                    "clip_high_fraction": masked_mean(high.float(), mask),
                    "entropy": masked_mean(entropy(log_probs), mask),
                    "kl_k3": masked_mean(kl, mask),
                }
            for key, value in micro_stats.items():
                stats.setdefault(key, []).append(value.item())
    policy.eval()
    return {key: sum(values) / len(values) for key, values in stats.items()}


@dataclass
class LoopState:
    stream: PromptStream
    data_order: torch.Generator

    def state(self) -> dict[str, Any]:
        return {"prompt_order": self.stream.order, "prompt_cursor": self.stream.cursor}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data_order": self.data_order.get_state()}

    def restore(self, resumed: Resumed) -> None:
        if resumed.done:
            self.stream.order, self.stream.cursor = (
                resumed.state["prompt_order"],
                resumed.state["prompt_cursor"],
            )
            self.data_order.set_state(resumed.tensors["data_order"])


def _step(
    models: Models, kernel: Kernel, loop: LoopState, config: Config, seed: int, step: int
) -> dict[str, float]:
    started, workers = time.perf_counter(), kernel.workers
    chosen = loop.stream.take(config.prompts_per_step)[workers.shard(config.prompts_per_step)]
    records = [record for record, _ in chosen]
    group = collect_group(
        models,
        records,
        [ids for _, ids in chosen],
        config,
        sampling_generator(seed, workers.rank, step, models.policy.device),
    )
    train_stats = grpo_update(models, kernel, group, config, loop.data_order)
    elapsed = time.perf_counter() - started
    groups = group.rewards.view(-1, config.num_generations)
    lengths = group.batch.response_mask.float().sum(-1)
    metrics = kernel.reduce(
        {
            "reward": group.rewards.mean().item(),
            **group.per_reward,
            "reward_std_within_groups": groups.std(-1).mean().item(),
            "zero_std_group_fraction": (groups.std(-1) < 1e-6).float().mean().item(),
            "kl": group.kl,
            "completion_length": lengths.mean().item(),
            "truncated_fraction": (~group.batch.ended_with_eos).float().mean().item(),
            **train_stats,
        }
    )
    episodes = config.prompts_per_step * config.num_generations
    return metrics | {"episodes_per_second": episodes / elapsed}


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, STEP, config):
        job = start_training(config, inputs.policy, context.seed, STEP)
        models = _load_models(inputs, config, job)
        prompts = encode_prompts(
            models.fmt, inputs.prompts, config.max_prompt_tokens, STEP, "prompts for GRPO"
        )
        episodes_per_step = config.prompts_per_step * config.num_generations
        steps = max(1, config.total_episodes // episodes_per_step)
        loop = LoopState(PromptStream(prompts, job.data_order), job.data_order)
        optimizer_steps_per_step = config.num_iterations * config.num_minibatches
        kernel = Kernel(
            config,
            {"policy": models.policy},
            job.workers,
            steps * optimizer_steps_per_step,
            step_output(context, STEP, "checkpoint"),
            STEP,
            hold=optimizer_steps_per_step,
            compute_dtype=job.dtype,
        )
        metrics = {"reward": math.nan, "kl": math.nan}
        with kernel:
            resumed = kernel.resume()
            loop.restore(resumed)
            progress = units(STEP, resumed.done, steps)
            for step in progress:
                metrics = _step(models, kernel, loop, config, context.seed, step)
                progress.set_postfix(reward=f"{metrics['reward']:.3f}")
                kernel.completed(step, steps, metrics, loop.state(), loop.tensors())
        outputs = Outputs(
            **policy_outputs(context, STEP, config),
            steps=steps,
            final_reward=metrics["reward"],
            final_kl=metrics["kl"],
        )
        kernel.finish(lambda: save_policy(models.policy, models.fmt, outputs, inputs.policy, job.dtype))
        log.info("grpo: %d steps, final reward %.3f", steps, outputs.final_reward)
        return outputs
