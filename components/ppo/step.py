"""PPO for RLHF, top to bottom in one file.

Four models: the policy (trained), a frozen reference (the KL anchor), the frozen reward model, and a value
model initialised from the reward model with its normalisation folded in (trained). Dropout is off in all
four. With several workers (rlhf_components.distributed), each answers its share of the global prompt batch
with its own sampling seed, whitening uses every worker's rollout, and gradients are averaged. Each iteration:

1. rollout   — sample responses from the policy with the KV cache; keep the generation pass's log-probs;
2. score     — reference log-probs, values, and the reward model's score at the last real token, minus a
               penalty when no EOS was produced;
3. rewards   — per-token −β·KL (k1 or k3 estimator) with the score added at the last token; optional
               whitening without mean shift;
4. advantage — GAE(γ, λ) over response tokens only, then whitened;
5. optimise  — PPO epochs × minibatches (with gradient accumulation) of the clipped policy loss plus
               vf_coef × the clipped value loss, masked means over valid tokens;
6. KL control — a fixed β or the adaptive controller of Ziegler et al. (target, horizon).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from rlhf_components.core import checkpoint, storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import (
    Batch,
    encode_prompts,
    entropy,
    response_logits,
    response_logprobs,
    sample,
)
from rlhf_components.core.models import (
    fold_reward_normalization,
    load_policy,
    load_scalar_model,
    normalized_rewards,
    save_checkpoint,
    sequence_scores,
    token_scores,
)
from rlhf_components.core.runtime import (
    progress_disabled,
    sampling_generator,
    seed_everything,
    select_device,
)
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.distributed.collectives import Workers, join
from rlhf_components.ppo.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- numerics


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, workers: Workers | None = None
) -> torch.Tensor:
    """Normalise to unit variance over valid tokens (of every worker's rollout: the statistics are global);
    without mean shift the sign of rewards is preserved."""
    total = (workers or Workers()).sum
    count = total(mask.sum()).clamp(min=1)
    mean = total((values * mask).sum()) / count
    variance = total((((values - mean) * mask) ** 2).sum()) / count
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Estimators of KL(π‖π_ref) from samples of π: k1 = log r, k3 = (r⁻¹ − 1) + log r with r = π/π_ref."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; the value after the last real token is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, ratio, clip indicator)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.maximum(unclipped, clipped), mask), ratio, (clipped > unclipped).float()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(½ · masked mean of the larger of the clipped and unclipped squared errors, clip indicator)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, (clipped_error > unclipped_error).float()


class KLController:
    """β, fixed or adapted toward a target KL (Ziegler et al. 2019).

    Adaptive: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/H) after each rollout of n episodes, horizon H.
    """

    def __init__(self, config: Config) -> None:
        self.value = config.kl_coef
        self.adaptive = config.kl_controller == "adaptive"
        self.target = config.kl_target
        self.horizon = config.kl_horizon

    def update(self, current_kl: float, episodes: int) -> None:
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * episodes / self.horizon


# ----------------------------------------------------------------------------- rollout


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
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    reward_model: PreTrainedModel,
    value_model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    config: Config,
    kl_coef: float,
    eos_token_id: int,
    pad_token_id: int,
    sampler: torch.Generator,
    workers: Workers | None = None,
) -> Rollout:
    started = time.perf_counter()
    batch = sample(policy, query_ids, query_mask, config.sampling, eos_token_id, pad_token_id, sampler)
    generated = time.perf_counter()
    mask = batch.response_mask.float()
    ref_logprobs = response_logprobs(reference, batch, config.sampling.temperature)
    values = response_values(value_model, batch) * mask
    ids, sequence_mask, _ = batch.sequence()
    scores = normalized_rewards(
        reward_model, sequence_scores(reward_model, ids, sequence_mask, batch.last_token_index())
    )
    scores = scores - config.missing_eos_penalty * (~batch.ended_with_eos).float()
    kl = kl_per_token(batch.logprobs, ref_logprobs, config.kl_estimator) * mask
    rewards = -kl_coef * kl
    last = (batch.response_mask.sum(-1) - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, workers=workers)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    advantages = masked_whiten(advantages, mask, workers=workers)
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


def ppo_update(
    policy: PreTrainedModel,
    value_model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: Config,
    data_order: torch.Generator,
    workers: Workers | None = None,
) -> dict[str, float]:
    """PPO epochs × minibatches over this worker's rollout; returns its training statistics.

    The rollout is seen as `gradient_accumulation_steps` blocks of rows. Each epoch draws one permutation of
    a block's rows (the same on every worker) and minibatch m takes the m-th slice of it from every block:
    one micro-batch per block. The minibatch loss is the mean of its micro-batch losses, over all workers'
    blocks. So W workers with accumulation A take exactly the step of one process with accumulation W·A whose
    rollout is the workers' rollouts one after another.
    """
    workers = workers or Workers()
    blocks = config.gradient_accumulation_steps
    block_size = rollout.batch.response_ids.shape[0] // blocks
    micro_size = block_size // config.num_minibatches
    trainable = [p for p in [*policy.parameters(), *value_model.parameters()] if p.requires_grad]
    stats: dict[str, list[float]] = {
        k: []
        for k in (
            "pg_loss",
            "vf_loss",
            "pg_clipfrac",
            "vf_clipfrac",
            "approx_kl",
            "entropy",
            "ratio_mean",
            "ratio_var",
        )
    }
    first_ratio: float | None = None
    policy.train()
    value_model.train()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(block_size, generator=data_order, device=data_order.device)
        for mb_start in range(0, block_size, micro_size):
            optimizer.zero_grad(set_to_none=True)
            for block in range(blocks):
                rows = block * block_size + order[mb_start : mb_start + micro_size]
                micro = rollout.batch.rows(rows)
                mask = micro.response_mask.float()
                width = mask.shape[1]
                logits = response_logits(policy, micro, config.sampling.temperature)
                log_probs = logits.log_softmax(-1)
                logprobs = log_probs.gather(-1, micro.response_ids[..., None]).squeeze(-1) * mask
                pg_loss, ratio, pg_clipped = policy_loss(
                    logprobs, micro.logprobs, rollout.advantages[rows, :width], mask, config.cliprange
                )
                values = response_values(value_model, micro)
                vf_loss, vf_clipped = value_loss(
                    values,
                    rollout.values[rows, :width],
                    rollout.returns[rows, :width],
                    mask,
                    config.cliprange_value,
                )
                loss = (pg_loss + config.vf_coef * vf_loss) / blocks
                loss.backward()
                with torch.no_grad():
                    if first_ratio is None:
                        first_ratio = masked_mean(ratio, mask).item()
                    ratio_mean = masked_mean(ratio, mask)
                    stats["pg_loss"].append(pg_loss.item())
                    stats["vf_loss"].append(vf_loss.item())
                    stats["pg_clipfrac"].append(masked_mean(pg_clipped, mask).item())
                    stats["vf_clipfrac"].append(masked_mean(vf_clipped, mask).item())
                    stats["approx_kl"].append(
                        0.5 * masked_mean((logprobs - micro.logprobs) ** 2, mask).item()
                    )
                    stats["entropy"].append(masked_mean(entropy(log_probs), mask).item())
                    stats["ratio_mean"].append(ratio_mean.item())
                    stats["ratio_var"].append(masked_mean((ratio - ratio_mean) ** 2, mask).item())
            workers.after_backward(trainable)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            workers.after_step(trainable)
    policy.eval()
    value_model.eval()
    summary = {key: sum(values) / len(values) for key, values in stats.items()}
    summary["first_minibatch_ratio"] = float(first_ratio if first_ratio is not None else math.nan)
    return summary


def _load_prompts(uri: str) -> list[str]:
    prompts = [json.loads(line)["prompt"] for _, line in storage.read_jsonl(uri)]
    if not prompts:
        raise UserError(f"{uri}: no prompts for PPO")
    return prompts


class PromptStream:
    """Prompts in a seeded random order, reshuffled after each pass; its position is part of a checkpoint."""

    def __init__(self, prompts: list[str], generator: torch.Generator) -> None:
        self.prompts = prompts
        self.generator = generator
        self.order = torch.randperm(len(prompts), generator=generator).tolist()
        self.cursor = 0

    def take(self, count: int) -> list[str]:
        chosen = []
        for _ in range(count):
            if self.cursor == len(self.order):
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
                self.cursor = 0
            chosen.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return chosen


@dataclass
class Trainer:
    """Everything a checkpoint must capture for a resumed run to equal an uninterrupted one."""

    config: Config
    policy: PreTrainedModel
    value_model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    kl_controller: KLController
    stream: PromptStream
    data_order: torch.Generator
    """prompt order and minibatch shuffles: the same on every worker (sampling is seeded per iteration)"""

    def save(self, uri: str, iteration: int) -> None:
        optimizer_tensors, optimizer_rest = checkpoint.flatten_optimizer("optimizer", self.optimizer)
        tensors = {
            **checkpoint.prefixed("policy", self.policy.state_dict()),
            **checkpoint.prefixed("value", self.value_model.state_dict()),
            **optimizer_tensors,
            "rng.data_order": self.data_order.get_state(),
            "rng.torch": torch.get_rng_state(),
        }
        state = {
            "config": self.config.checkpoint_fingerprint(),
            "optimizer": optimizer_rest,
            "schedule": self.schedule.state_dict(),
            "kl_coef": self.kl_controller.value,
            "prompt_order": self.stream.order,
            "prompt_cursor": self.stream.cursor,
        }
        checkpoint.save(uri, iteration, tensors, state)

    def restore(self, uri: str) -> int:
        """Load the checkpoint at `uri`; returns the iteration it was taken after."""
        tensors, state = checkpoint.load(uri)
        if state["config"] != self.config.checkpoint_fingerprint():
            raise UserError(f"{uri}: checkpoint was written with a different ppo config; set resume: false")
        self.policy.load_state_dict(checkpoint.unprefixed("policy", tensors))
        self.value_model.load_state_dict(checkpoint.unprefixed("value", tensors))
        checkpoint.restore_optimizer("optimizer", self.optimizer, tensors, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.kl_controller.value = state["kl_coef"]
        self.stream.order, self.stream.cursor = state["prompt_order"], state["prompt_cursor"]
        self.data_order.set_state(tensors["rng.data_order"])
        torch.set_rng_state(tensors["rng.torch"])
        log.info("resumed from %s after iteration %d", uri, state["step"])
        return int(state["step"])


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "ppo", config):
        device = select_device(config.device, "ppo")
        workers = join(config, device)
        data_order = seed_everything(context.seed)
        prompts = _load_prompts(inputs.prompts)
        remote = config.trust_remote_code
        policy, tokenizer = load_policy(inputs.policy, remote, device)
        reference, _ = load_policy(inputs.reference or inputs.policy, remote, device)
        reward_model, reward_tokenizer = load_scalar_model(inputs.reward_model, remote, device)
        value_model, _ = load_scalar_model(inputs.reward_model, remote, device)
        fold_reward_normalization(value_model)  # values start on the scale of the rewards PPO sees
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{inputs.reward_model}: the reward model's tokenizer differs from the policy's")
        for frozen in (reference, reward_model):
            frozen.eval().requires_grad_(False)
        policy.eval()
        value_model.eval()

        iterations = max(1, config.total_episodes // config.rollout_batch_size)
        optimizer = torch.optim.AdamW(
            [*policy.parameters(), *value_model.parameters()],
            lr=config.learning_rate,
            eps=config.adam_eps,
            fused=True,  # one kernel for all parameters: per-tensor Adam was 10% of a demo iteration
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, (lambda i: 1.0 - i / iterations) if config.lr_schedule == "linear" else (lambda i: 1.0)
        )
        trainer = Trainer(
            config,
            policy,
            value_model,
            optimizer,
            schedule,
            KLController(config),
            PromptStream(prompts, data_order),
            data_order,
        )
        checkpoint_uri = step_output(context, "ppo", "checkpoint")
        done = trainer.restore(checkpoint_uri) if config.resume and checkpoint.exists(checkpoint_uri) else 0
        score = kl_total = float("nan")
        with checkpoint.StopRequest() as stop:
            progress = tqdm(
                range(done + 1, iterations + 1),
                desc="ppo",
                disable=progress_disabled(),
                initial=done,
                total=iterations,
            )
            for iteration in progress:
                started, communicated = time.perf_counter(), workers.communication_seconds
                # Every worker draws the global batch from the shared stream and answers its own part.
                prompt_batch = trainer.stream.take(config.rollout_batch_size)[
                    workers.shard(config.rollout_batch_size)
                ]
                query_ids, query_mask = (
                    t.to(device) for t in encode_prompts(tokenizer, prompt_batch, config.max_prompt_tokens)
                )
                rollout = collect_rollout(
                    policy,
                    reference,
                    reward_model,
                    value_model,
                    query_ids,
                    query_mask,
                    config,
                    trainer.kl_controller.value,
                    tokenizer.eos_token_id,
                    tokenizer.pad_token_id,
                    sampling_generator(context.seed, workers.rank, iteration, device),
                    workers,
                )
                rollout_seconds = time.perf_counter() - started
                train_stats = ppo_update(policy, value_model, optimizer, rollout, config, data_order, workers)
                schedule.step()
                elapsed = time.perf_counter() - started

                mask = rollout.batch.response_mask.float()
                score = rollout.scores.mean().item()
                non_score = (rollout.rewards * mask).sum(-1).mean().item() - score
                local = {
                    "score": score,
                    "non_score_reward": non_score,
                    "kl": (rollout.kl * mask).sum(-1).mean().item(),
                    "eos_rate": rollout.batch.ended_with_eos.float().mean().item(),
                    "response_length": mask.sum(-1).mean().item(),
                    "tokens_per_second": mask.sum().item() / elapsed * workers.world_size,
                    "generation_seconds": rollout.generation_seconds,
                    "scoring_seconds": rollout.scoring_seconds,
                    "training_seconds": elapsed - rollout_seconds,
                    "communication_seconds": workers.communication_seconds - communicated,
                    "stop_requested": float(stop.requested),
                    **train_stats,
                }
                metrics = workers.mean_metrics(local)  # the whole job's numbers, on every worker
                score, kl_total = metrics["score"], metrics["kl"]
                stopping = metrics.pop("stop_requested") > 0
                trainer.kl_controller.update(kl_total, config.rollout_batch_size)
                metrics |= {
                    "rlhf_reward": score + metrics["non_score_reward"],
                    "kl_coef": trainer.kl_controller.value,
                    "episodes_per_second": config.rollout_batch_size / elapsed,
                    "learning_rate": schedule.get_last_lr()[0],
                }
                log_metrics(metrics, step=iteration)
                progress.set_postfix(score=f"{score:.2f}", kl=f"{kl_total:.2f}")
                periodic = config.checkpoint_every and iteration % config.checkpoint_every == 0
                if stopping or (periodic and iteration < iterations):
                    if workers.is_main:
                        trainer.save(checkpoint_uri, iteration)
                    workers.barrier()
                if stopping:
                    raise UserError(
                        f"ppo: stopped by SIGTERM after iteration {iteration}/{iterations}; "
                        f"run it again to resume from {checkpoint_uri}"
                    )
        workers.finish([*policy.parameters(), *value_model.parameters()])
        outputs = Outputs(
            policy=step_output(context, "ppo", "policy"),
            iterations=iterations,
            final_score=score,
            final_kl=kl_total,
        )
        if workers.is_main:
            policy.generation_config.pad_token_id = tokenizer.pad_token_id
            save_checkpoint(policy, tokenizer, outputs.policy)
        workers.barrier()  # the policy is written before any worker reports success
        log.info("ppo: %d iterations, final score %.3f, KL %.3f", iterations, score, kl_total)
        return outputs
