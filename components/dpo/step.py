"""Direct Preference Optimization (Rafailov et al. 2023), top to bottom in one file.

The policy learns from preference pairs directly, against a frozen reference policy (the SFT model):

1. reference — the reference's log-probability of every chosen and rejected response is computed once, in
               one pass, and the reference is then freed: it never shares memory with training;
2. optimise  — for each batch, the policy's log-probabilities log π(y|x), summed over response tokens only
               (prompt and pad tokens never count), give the implicit rewards r = β·(log π − log π_ref); the
               loss is one of core.losses.preference_loss (sigmoid, robust, hinge, IPO), plus sft_coef × the
               chosen responses' mean token NLL;
3. evaluate  — the same quantities on held-out pairs: loss, reward accuracy (r_c > r_r) and margin.

With several workers each scores its share of every global batch and the gradients are averaged, as in
reward-model training; optimizer, schedule, workers and checkpoints are the trainer kernel's (core.trainer).
With `lora:` (core.lora) the policy trains adapters on its frozen base, and when the reference is the policy's
own checkpoint its log-probs come from that base before the adapters are added: no second model is loaded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.generation import positions
from rlhf_components.core.lora import add_adapters, save_policy
from rlhf_components.core.losses import preference_loss
from rlhf_components.core.models import load_policy
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.core.trainer import (
    EncodedPair,
    Pairs,
    encode_pairs,
    fit_pairs,
    policy_outputs,
    start_training,
)
from rlhf_components.dpo.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

STEP = "dpo"


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, STEP, config):
        job = start_training(config, inputs.policy, context.seed, STEP)
        trained_dtype = job.dtype if config.lora else torch.float32  # LoRA: a frozen base
        policy, fmt = load_policy(inputs.policy, config, job.device, dtype=trained_dtype)
        pairs = encode_pairs(fmt, config, inputs.train, inputs.eval, job)
        if config.lora and inputs.reference in (None, inputs.policy):
            reference_train, reference_eval = _reference_logps(policy, fmt, pairs, config)
        else:
            reference, reference_fmt = load_policy(
                inputs.reference or inputs.policy, config, job.device, dtype=job.dtype
            )
            reference_train, reference_eval = _reference_logps(reference, reference_fmt, pairs, config)
            del reference  # training holds one model
        if config.lora:
            add_adapters(policy, config.lora, STEP)

        def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            batch = [pairs.train[row] for row in rows]
            loss, stats = _batch_loss(policy, fmt, batch, reference_train[rows], config)
            return loss, {key: value.mean().item() for key, value in stats.items()}

        kernel = fit_pairs(config, {"policy": policy}, job, pairs, context, batch_loss)
        outputs = Outputs(
            **policy_outputs(context, STEP, config),
            steps=config.total_steps(len(pairs.train)),
            eval_reward_accuracy=math.nan,
            eval_reward_margin=math.nan,
            eval_loss=math.nan,
        )

        def evaluate_and_save() -> Outputs:
            evaluated = _evaluate(outputs, policy, fmt, pairs.held_out, reference_eval, config)
            save_policy(policy, fmt, outputs, inputs.policy, job.dtype)
            return evaluated

        return kernel.finish(evaluate_and_save) or outputs


def response_logps(
    model: PreTrainedModel, fmt: ChatFormat, answers: Sequence[tuple[list[int], list[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over each answer's tokens and its stop token, that token count) at temperature 1, for
    (prompt ids, answer ids) pairs."""
    ids, mask, answer_mask = (t.to(model.device) for t in fmt.right_padded(answers))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    token_logps = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    predicted = answer_mask[:, 1:].float()  # position t predicts token t + 1
    return (token_logps * predicted).sum(-1), predicted.sum(-1)


def pair_logps(
    model: PreTrainedModel, fmt: ChatFormat, pairs: list[EncodedPair]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π of the chosen responses, of the rejected ones, token counts of the chosen): one forward pass."""
    answers = [(p, chosen) for p, chosen, _ in pairs] + [(p, rejected) for p, _, rejected in pairs]
    logps, counts = response_logps(model, fmt, answers)
    return logps[: len(pairs)], logps[len(pairs) :], counts[: len(pairs)]


@torch.no_grad()
def reference_logps(
    reference: PreTrainedModel, fmt: ChatFormat, pairs: list[EncodedPair], config: Config
) -> torch.Tensor:
    """[pairs, 2]: the reference's log π of each chosen and rejected response."""
    rows = [torch.zeros(0, 2, device=reference.device)]
    for start in range(0, len(pairs), config.batch_size):
        chosen, rejected, _ = pair_logps(reference, fmt, pairs[start : start + config.batch_size])
        rows.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(rows)


def _reference_logps(
    reference: PreTrainedModel, fmt: ChatFormat, pairs: Pairs, config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of the training and held-out pairs (the reference in the compute dtype)."""
    started = time.perf_counter()
    reference.eval()
    train = reference_logps(reference, fmt, pairs.train, config)
    held_out = reference_logps(reference, fmt, pairs.held_out, config)
    seconds = time.perf_counter() - started
    log_metrics({"reference_seconds": seconds})
    log.info(
        "dpo: reference log-probs of %d pairs in %.1f s", len(pairs.train) + len(pairs.held_out), seconds
    )
    return train, held_out


def _batch_loss(
    policy: PreTrainedModel,
    fmt: ChatFormat,
    pairs: list[EncodedPair],
    reference: torch.Tensor,
    config: Config,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the pairs, with the SFT term; per-pair statistics)."""
    chosen, rejected, chosen_tokens = pair_logps(policy, fmt, pairs)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, reference[:, 0], reference[:, 1], config.loss, config.beta, config.label_smoothing
    )
    loss = losses.mean()
    if config.sft_coef > 0:
        loss = loss + config.sft_coef * (-chosen / chosen_tokens.clamp(min=1)).mean()
    return loss, {
        "loss": losses.detach(),
        "rewards_chosen": chosen_rewards,
        "rewards_rejected": rejected_rewards,
        "reward_margin": chosen_rewards - rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
        "logps_chosen": chosen.detach(),
        "logps_rejected": rejected.detach(),
    }


@torch.no_grad()
def _evaluate(
    outputs: Outputs,
    policy: PreTrainedModel,
    fmt: ChatFormat,
    pairs: list[EncodedPair],
    reference: torch.Tensor,
    config: Config,
) -> Outputs:
    if not pairs:
        return outputs
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), config.batch_size):
        batch = pairs[start : start + config.batch_size]
        _, stats = _batch_loss(policy, fmt, batch, reference[start : start + len(batch)], config)
        for key, values in stats.items():
            totals[key] = totals.get(key, 0.0) + values.sum().item()
    means = {f"eval_{key}": value / len(pairs) for key, value in totals.items()}
    log_metrics(means)
    log.info(
        "dpo: held-out reward accuracy %.3f, margin %.3f",
        means["eval_reward_accuracy"],
        means["eval_reward_margin"],
    )
    return outputs.model_copy(
        update={
            "eval_reward_accuracy": means["eval_reward_accuracy"],
            "eval_reward_margin": means["eval_reward_margin"],
            "eval_loss": means["eval_loss"],
        }
    )
