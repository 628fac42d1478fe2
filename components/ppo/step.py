"""PPO for RLHF, top to bottom in one file.

Four models: the policy (trained), a frozen reference (the KL anchor), the frozen reward model, and a value
model (trained) initialised from the reward model with its normalisation folded in, or from the policy with a
new head when the reward model reads text differently (another tokenizer or chat template: its scores then
come from the decoded answers, re-encoded its way). Dropout is off in all four. With `lora:` (core.lora) the
policy and value model train adapters on frozen bases: the reference is the policy with its adapters
disabled, and the reward model is the value model's base with its adapters and head switched back. With
several workers (rlhf_components.distributed), each answers its share of the global prompt batch with its own
sampling seed, whitening uses every worker's rollout, and gradients are averaged. Each iteration:

1. rollout   — sample responses from the policy with the KV cache; keep the generation pass's log-probs;
2. score     — reference log-probs, values, and the reward model's score at the last real token, minus a
               penalty when no EOS was produced;
3. rewards   — per-token −β·KL (k1 or k3 estimator) with the score added at the last token; optional
               whitening without mean shift;
4. advantage — GAE(γ, λ) over response tokens only, then whitened;
5. optimise  — PPO epochs × minibatches (with gradient accumulation) of the clipped policy loss plus
               vf_coef × the clipped value loss, masked means over valid tokens;
6. KL control — a fixed β or the adaptive controller of Ziegler et al. (target, horizon).

The formulas are core.losses'; the optimizer, learning-rate schedule, gradient accumulation and sync,
checkpoints and SIGTERM handling are the trainer kernel's (core.trainer).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from rlhf_components.core.chat import ChatFormat, PromptStream, encode_prompts, same_reading
from rlhf_components.core.generation import (
    Batch,
    decode_responses,
    response_logits,
    response_logprobs,
    sample,
)
from rlhf_components.core.lora import adapters_disabled, add_adapters, save_policy
from rlhf_components.core.losses import (
    KLController,
    entropy,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from rlhf_components.core.models import (
    fold_reward_normalization,
    init_scalar_head,
    load_policy,
    load_scalar_model,
    normalized_rewards,
    score_texts,
    sequence_scores,
    token_scores,
)
from rlhf_components.core.records import Prompt
from rlhf_components.core.runtime import sampling_generator
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, step_run
from rlhf_components.core.trainer import Job, Kernel, Resumed, policy_outputs, start_training, units
from rlhf_components.distributed.collectives import Workers
from rlhf_components.ppo.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

STEP = "ppo"


# ----------------------------------------------------------------------------- rollout


@dataclass
class RewardScorer:
    """The reward model's raw score of each answer of a rollout. When it reads text as the policy does (same
    vocabulary, template and BOS), it scores the policy's own tokens; otherwise the answers are decoded and
    the conversations re-encoded its way, batched."""

    model: PreTrainedModel
    fmt: ChatFormat
    policy_fmt: ChatFormat

    @property
    def reads_policy_tokens(self) -> bool:
        return same_reading(self.fmt, self.policy_fmt)

    def __call__(self, batch: Batch, prompts: Sequence[Prompt]) -> torch.Tensor:
        with adapters_disabled(self.model):  # the value model's adapters, where it shares this base
            if self.reads_policy_tokens:
                ids, mask, _ = batch.sequence()
                return sequence_scores(self.model, ids, mask, batch.last_token_index())
            texts = decode_responses(self.policy_fmt, batch)
            return score_texts(self.model, self.fmt, prompts, texts)


@dataclass
class Models:
    policy: PreTrainedModel
    reference: PreTrainedModel
    reward: RewardScorer
    value_model: PreTrainedModel
    fmt: ChatFormat
    """how the policy (and its reference and value model) read prompts"""


@dataclass
class Rollout:
    batch: Batch
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    generation_seconds: float
    scoring_seconds: float


def response_values(value_model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """V(state before each response token), [batch, response_len]."""
    ids, mask, position = batch.sequence()
    start = batch.query_ids.shape[1] - 1
    return token_scores(value_model, ids, mask, position)[:, start : start + batch.response_ids.shape[1]]


@torch.no_grad()
def collect_rollout(
    models: Models,
    query: tuple[torch.Tensor, torch.Tensor],
    prompts: Sequence[Prompt],
    config: Config,
    kl_coef: float,
    sampler: torch.Generator,
    workers: Workers | None = None,
) -> Rollout:
    """Sample answers to `prompts` (encoded and left-padded as `query`: ids, mask) and score them."""
    started = time.perf_counter()
    batch = sample(models.policy, *query, config.sampling, models.fmt, sampler)
    generated = time.perf_counter()
    mask = batch.response_mask.float()
    with adapters_disabled(models.reference):  # the policy's adapters, where it is its own reference
        ref_logprobs = response_logprobs(models.reference, batch, config.sampling.temperature)
    values = response_values(models.value_model, batch) * mask
    scores = normalized_rewards(models.reward.model, models.reward(batch, prompts))
    scores = scores - config.missing_eos_penalty * (~batch.ended_with_eos).float()
    kl = kl_per_token(batch.logprobs, ref_logprobs, config.kl_estimator) * mask
    rewards = -kl_coef * kl
    last = (batch.response_mask.sum(-1) - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    over_all_workers = (workers or Workers()).sum  # whitening statistics of every worker's rollout
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=over_all_workers)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    advantages = masked_whiten(advantages, mask, reduce=over_all_workers)
    return Rollout(
        batch,
        ref_logprobs,
        values,
        scores,
        kl,
        rewards,
        advantages,
        returns,
        generated - started,
        time.perf_counter() - generated,
    )


# ----------------------------------------------------------------------------- optimisation


def ppo_kernel(
    config: Config,
    policy: PreTrainedModel,
    value_model: PreTrainedModel,
    workers: Workers,
    iterations: int,
    checkpoint_uri: str,
    compute_dtype: torch.dtype = torch.float32,
) -> Kernel:
    """The trainer kernel for PPO: policy and value model trained together, one optimizer step per
    minibatch (its `gradient_accumulation_steps` micro-batches accumulated), and one learning rate per
    iteration."""
    steps_per_iteration = config.ppo_epochs * config.num_minibatches
    return Kernel(
        config,
        {"policy": policy, "value": value_model},
        workers,
        iterations * steps_per_iteration,
        checkpoint_uri,
        STEP,
        accumulation_steps=config.gradient_accumulation_steps,
        hold=steps_per_iteration,
        unit="iteration",
        compute_dtype=compute_dtype,
    )


def ppo_update(
    policy: PreTrainedModel,
    value_model: PreTrainedModel,
    kernel: Kernel,
    rollout: Rollout,
    config: Config,
    data_order: torch.Generator,
) -> dict[str, float]:
    """PPO epochs × minibatches over this worker's rollout; returns its training statistics.

    The rollout is seen as `gradient_accumulation_steps` blocks of rows. Each epoch draws one permutation of
    a block's rows (the same on every worker) and minibatch m takes the m-th slice of it from every block:
    one micro-batch per block, each a `kernel.step`, so the minibatch's update is the mean of its
    micro-batch losses over all workers' blocks. So W workers with accumulation A take exactly the step of
    one process with accumulation W·A whose rollout is the workers' rollouts one after another.
    """
    blocks = config.gradient_accumulation_steps
    block_size = rollout.batch.response_ids.shape[0] // blocks
    micro_size = block_size // config.num_minibatches
    stats: dict[str, list[float]] = {}
    first_ratio: float | None = None
    policy.train()
    value_model.train()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(block_size, generator=data_order, device=data_order.device)
        for mb_start in range(0, block_size, micro_size):
            for block in range(blocks):
                rows = block * block_size + order[mb_start : mb_start + micro_size]
                micro = rollout.batch.rows(rows)
                mask = micro.response_mask.float()
                width = mask.shape[1]
                log_probs = response_logits(policy, micro, config.sampling.temperature).log_softmax(-1)
                logprobs = log_probs.gather(-1, micro.response_ids[..., None]).squeeze(-1) * mask
                pg_loss, ratio, pg_clipped = policy_loss(
                    logprobs, micro.logprobs, rollout.advantages[rows, :width], mask, config.cliprange
                )
                # The two models share no trained parameter: the policy's activations are freed before the
                # value model's forward pass, and the gradients are those of pg_loss + vf_coef × vf_loss.
                kernel.backward(pg_loss)
                vf_loss, vf_clipped = value_loss(
                    response_values(value_model, micro),
                    rollout.values[rows, :width],
                    rollout.returns[rows, :width],
                    mask,
                    config.cliprange_value,
                )
                kernel.step(config.vf_coef * vf_loss)
                with torch.no_grad():
                    ratio_mean = masked_mean(ratio, mask)
                    if first_ratio is None:
                        first_ratio = ratio_mean.item()
                    micro_stats = {
                        "pg_loss": pg_loss,
                        "vf_loss": vf_loss,
                        "pg_clipfrac": masked_mean(pg_clipped, mask),
                        "vf_clipfrac": masked_mean(vf_clipped, mask),
                        "approx_kl": 0.5 * masked_mean((logprobs - micro.logprobs) ** 2, mask),
                        "entropy": masked_mean(entropy(log_probs), mask),
                        "ratio_mean": ratio_mean,
                        "ratio_var": masked_mean((ratio - ratio_mean) ** 2, mask),
                    }
                for key, value in micro_stats.items():
                    stats.setdefault(key, []).append(value.item())
    policy.eval()
    value_model.eval()
    summary = {key: sum(values) / len(values) for key, values in stats.items()}
    summary["first_minibatch_ratio"] = float(first_ratio if first_ratio is not None else math.nan)
    return summary


# ----------------------------------------------------------------------------- the run


@dataclass
class LoopState:
    """PPO's own part of a checkpoint (the kernel keeps weights, optimizer and schedule): with it a resumed
    run equals an uninterrupted one."""

    stream: PromptStream
    kl_controller: KLController
    data_order: torch.Generator
    """prompt order and minibatch shuffles: the same on every worker (sampling is seeded per iteration)"""

    def state(self) -> dict[str, Any]:
        return {
            "kl_coef": self.kl_controller.value,
            "prompt_order": self.stream.order,
            "prompt_cursor": self.stream.cursor,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data_order": self.data_order.get_state()}

    def restore(self, resumed: Resumed) -> None:
        if resumed.done:
            self.kl_controller.value = resumed.state["kl_coef"]
            self.stream.order, self.stream.cursor = (
                resumed.state["prompt_order"],
                resumed.state["prompt_cursor"],
            )
            self.data_order.set_state(resumed.tensors["data_order"])


def _load_models(inputs: Inputs, config: Config, job: Job) -> Models:
    """Policy and value model in float32 (the trainer's master weights), reference and reward model in the
    compute dtype. The value model starts from the reward model with its normalisation folded into the head
    (its values start on the rewards' scale) when the two read text alike, else from the policy with a new
    head. Only the policy and the value model train. Under LoRA the trained models' bases are frozen in the
    compute dtype and double as the reference (when it is the policy's checkpoint) and the reward model."""
    lora = config.lora
    trained_dtype = job.dtype if lora else torch.float32
    policy, fmt = load_policy(inputs.policy, config, job.device, dtype=trained_dtype)
    shared_reference = lora is not None and inputs.reference in (None, inputs.policy)
    reference = (
        policy
        if shared_reference
        else load_policy(inputs.reference or inputs.policy, config, job.device, dtype=job.dtype)[0]
    )
    reward_model, reward_fmt = load_scalar_model(inputs.reward_model, config, job.device, dtype=job.dtype)
    reward = RewardScorer(reward_model, reward_fmt, fmt)
    if reward.reads_policy_tokens:
        value_model = (
            reward_model
            if lora
            else load_scalar_model(inputs.reward_model, config, job.device, dtype=torch.float32)[0]
        )
    else:
        log.info(
            "ppo: the reward model reads text its own way: answers are re-encoded for it, and the value "
            "model starts from the policy"
        )
        value_model, _ = load_scalar_model(inputs.policy, config, dtype=trained_dtype)
        init_scalar_head(value_model)
        value_model.to(job.device)
    for frozen in (reference, reward_model):
        frozen.eval().requires_grad_(False)
    if lora:
        add_adapters(policy, lora, STEP)
        add_adapters(value_model, lora.model_copy(update={"adapter": None}), STEP)
    if reward.reads_policy_tokens:
        fold_reward_normalization(value_model)  # into the value model's own head (its copy, under LoRA)
    policy.eval()
    value_model.eval()
    return Models(policy, reference, reward, value_model, fmt)


def _iteration(
    models: Models, kernel: Kernel, loop: LoopState, config: Config, seed: int, iteration: int
) -> dict[str, float]:
    """One rollout of this worker's share of the global prompt batch, one PPO update, the job's metrics."""
    started, workers = time.perf_counter(), kernel.workers
    prompts = loop.stream.take(config.rollout_batch_size)[workers.shard(config.rollout_batch_size)]
    device = models.policy.device
    query = tuple(t.to(device) for t in models.fmt.left_padded([ids for _, ids in prompts]))
    rollout = collect_rollout(
        models,
        (query[0], query[1]),
        [record.prompt for record, _ in prompts],
        config,
        loop.kl_controller.value,
        sampling_generator(seed, workers.rank, iteration, device),
        workers,
    )
    rollout_seconds = time.perf_counter() - started
    train_stats = ppo_update(models.policy, models.value_model, kernel, rollout, config, loop.data_order)
    elapsed = time.perf_counter() - started
    mask = rollout.batch.response_mask.float()
    score = rollout.scores.mean().item()
    metrics = kernel.reduce(
        {
            "score": score,
            "non_score_reward": (rollout.rewards * mask).sum(-1).mean().item() - score,
            "kl": (rollout.kl * mask).sum(-1).mean().item(),
            "eos_rate": rollout.batch.ended_with_eos.float().mean().item(),
            "response_length": mask.sum(-1).mean().item(),
            "tokens_per_second": mask.sum().item() / elapsed * workers.world_size,
            "generation_seconds": rollout.generation_seconds,
            "scoring_seconds": rollout.scoring_seconds,
            "training_seconds": elapsed - rollout_seconds,
            **train_stats,
        }
    )
    loop.kl_controller.update(metrics["kl"], config.rollout_batch_size)
    return metrics | {
        "rlhf_reward": metrics["score"] + metrics["non_score_reward"],
        "kl_coef": loop.kl_controller.value,
        "episodes_per_second": config.rollout_batch_size / elapsed,
    }


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, STEP, config):
        job = start_training(config, inputs.policy, context.seed, STEP)
        models = _load_models(inputs, config, job)
        prompts = encode_prompts(
            models.fmt, inputs.prompts, config.max_prompt_tokens, STEP, "prompts for PPO"
        )
        iterations = max(1, config.total_episodes // config.rollout_batch_size)
        loop = LoopState(
            PromptStream(prompts, job.data_order),
            KLController(
                config.kl_coef, config.kl_controller == "adaptive", config.kl_target, config.kl_horizon
            ),
            job.data_order,
        )
        checkpoint_uri = step_output(context, STEP, "checkpoint")
        metrics = {"score": math.nan, "kl": math.nan}
        kernel = ppo_kernel(
            config, models.policy, models.value_model, job.workers, iterations, checkpoint_uri, job.dtype
        )
        with kernel:
            resumed = kernel.resume()
            loop.restore(resumed)
            progress = units(STEP, resumed.done, iterations)
            for iteration in progress:
                metrics = _iteration(models, kernel, loop, config, context.seed, iteration)
                progress.set_postfix(score=f"{metrics['score']:.2f}", kl=f"{metrics['kl']:.2f}")
                kernel.completed(iteration, iterations, metrics, loop.state(), loop.tensors())
        outputs = Outputs(
            **policy_outputs(context, STEP, config),
            iterations=iterations,
            final_score=metrics["score"],
            final_kl=metrics["kl"],
        )
        # The policy is written, in the input's dtype, before any worker reports success.
        kernel.finish(lambda: save_policy(models.policy, models.fmt, outputs, inputs.policy, job.dtype))
        log.info(
            "ppo: %d iterations, final score %.3f, KL %.3f", iterations, outputs.final_score, outputs.final_kl
        )
        return outputs
