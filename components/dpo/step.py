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
"""

from __future__ import annotations

import logging
import math
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_components.core.generation import encode_prompt_response, positions
from rlhf_components.core.losses import preference_loss
from rlhf_components.core.models import load_policy, save_checkpoint
from rlhf_components.core.records import PreferencePair
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.core.trainer import PairData, fit_pairs, prepare_pairs
from rlhf_components.dpo.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

STEP = "dpo"


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, STEP, config):
        data = prepare_pairs(config, inputs.train, inputs.eval, context.seed, STEP)
        policy, tokenizer = load_policy(inputs.policy, config.trust_remote_code, data.device)
        reference_train, reference_eval = _reference_logps(inputs, tokenizer, data, config)

        def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            pairs = [data.train[row] for row in rows]
            loss, stats = _batch_loss(policy, tokenizer, pairs, reference_train[rows], config)
            return loss, {key: value.mean().item() for key, value in stats.items()}

        kernel = fit_pairs(config, {"policy": policy}, data, context, STEP, batch_loss)
        outputs = Outputs(
            policy=step_output(context, STEP, "policy"),
            steps=config.total_steps(len(data.train)),
            eval_reward_accuracy=math.nan,
            eval_reward_margin=math.nan,
            eval_loss=math.nan,
        )

        def evaluate_and_save() -> Outputs:
            evaluated = _evaluate(outputs, policy, tokenizer, data.held_out, reference_eval, config)
            save_checkpoint(policy, tokenizer, outputs.policy)
            return evaluated

        return kernel.finish(evaluate_and_save) or outputs


def response_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    config: Config,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over each response's tokens and EOS, that token count) at temperature 1."""
    ids, mask, response_mask = (
        t.to(model.device) for t in encode_prompt_response(tokenizer, prompts, responses, config.max_length)
    )
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    predicted = response_mask[:, 1:].float()  # position t predicts token t + 1
    return (token_logps * predicted).sum(-1), predicted.sum(-1)


def pair_logps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], config: Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π of the chosen responses, of the rejected ones, token counts of the chosen): one forward pass."""
    prompts = [p.prompt for p in pairs]
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    logps, counts = response_logps(model, tokenizer, prompts + prompts, answers, config)
    return logps[: len(pairs)], logps[len(pairs) :], counts[: len(pairs)]


@torch.no_grad()
def reference_logps(
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PreferencePair],
    config: Config,
) -> torch.Tensor:
    """[pairs, 2]: the reference's log π of each chosen and rejected response."""
    rows = []
    for start in range(0, len(pairs), config.batch_size):
        chosen, rejected, _ = pair_logps(
            reference, tokenizer, pairs[start : start + config.batch_size], config
        )
        rows.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 2, device=reference.device)


def _reference_logps(
    inputs: Inputs, tokenizer: PreTrainedTokenizerBase, data: PairData, config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of the training and held-out pairs; the reference is freed afterwards, so
    training holds one model."""
    started = time.perf_counter()
    reference, _ = load_policy(inputs.reference or inputs.policy, config.trust_remote_code, data.device)
    reference.eval()
    train, held_out = (
        reference_logps(reference, tokenizer, pairs, config) for pairs in (data.train, data.held_out)
    )
    seconds = time.perf_counter() - started
    log_metrics({"reference_seconds": seconds})
    log.info("dpo: reference log-probs of %d pairs in %.1f s", len(data.train) + len(data.held_out), seconds)
    return train, held_out


def _batch_loss(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PreferencePair],
    reference: torch.Tensor,
    config: Config,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the pairs, with the SFT term; per-pair statistics)."""
    chosen, rejected, chosen_tokens = pair_logps(policy, tokenizer, pairs, config)
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
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[PreferencePair],
    reference: torch.Tensor,
    config: Config,
) -> Outputs:
    if not pairs:
        return outputs
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), config.batch_size):
        batch = pairs[start : start + config.batch_size]
        _, stats = _batch_loss(policy, tokenizer, batch, reference[start : start + len(batch)], config)
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
