"""Reward model training: Bradley–Terry on preference pairs, read at the last real token.

The model is the policy's backbone with a fresh scalar head (init N(0, 1/sqrt(d+1))), trained for one epoch
by default with the learning rate annealed linearly to zero. Afterwards its rewards are normalised so the
reference policy's answers (the ones annotators judged) score mean 0, std 1: PPO's KL coefficient then means
the same thing whatever the reward model. With several workers each scores its share of every global batch
and the gradients are averaged (core.trainer); a checkpoint resumes where a stopped run left off.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_components.core.losses import bradley_terry_loss
from rlhf_components.core.models import (
    REWARD_MEAN_KEY,
    REWARD_STD_KEY,
    load_scalar_model,
    save_checkpoint,
    scalar_head,
    score_texts,
)
from rlhf_components.core.records import PreferencePair
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.core.trainer import PairData, fit_pairs, prepare_pairs
from rlhf_components.train_reward_model.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

STEP = "train_reward_model"


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, STEP, config):
        data = prepare_pairs(config, inputs.train, inputs.eval, context.seed, STEP)
        model, tokenizer = _with_new_head(inputs.base_model, config, data.device)

        def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            pairs = [data.train[row] for row in rows]
            chosen, rejected = _pair_scores(model, tokenizer, pairs, config.max_length)
            loss = bradley_terry_loss(chosen, rejected, config.margin, config.center_rewards_coef)
            return loss, {"loss": loss.item(), "batch_accuracy": (chosen > rejected).float().mean().item()}

        kernel = fit_pairs(config, {"reward_model": model}, data, context, STEP, batch_loss)
        uri = step_output(context, STEP, "model")
        saved = kernel.finish(lambda: _normalise_and_save(model, tokenizer, data, config, uri))
        # Rank 0's outputs are the job's; the other workers' are never read.
        return saved or Outputs(
            reward_model=uri, eval_accuracy=math.nan, train_accuracy=math.nan, num_train_pairs=len(data.train)
        )


def _with_new_head(
    base_model: str, config: Config, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = load_scalar_model(base_model, config.trust_remote_code)
    head = scalar_head(model)
    with torch.no_grad():  # on the CPU, so the initial head is the same whatever the device
        head.weight.normal_(0.0, 1.0 / math.sqrt(model.config.hidden_size + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return model.to(device), tokenizer


def _pair_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores of the chosen answers, of the rejected ones): one forward pass over both."""
    prompts = [p.prompt for p in pairs]
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = score_texts(model, tokenizer, prompts + prompts, answers, max_length)
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def _all_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for start in range(0, len(pairs), config.batch_size * 4):
        c, r = _pair_scores(model, tokenizer, pairs[start : start + config.batch_size * 4], config.max_length)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def _normalise_and_save(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: PairData, config: Config, uri: str
) -> Outputs:
    """Accuracies, the normalisation that makes the judged answers score mean 0 and std 1, the checkpoint."""
    train_chosen, train_rejected = _all_scores(model, tokenizer, data.train, config)
    train_accuracy = (train_chosen > train_rejected).float().mean().item()
    eval_accuracy = math.nan
    if data.held_out:
        eval_chosen, eval_rejected = _all_scores(model, tokenizer, data.held_out, config)
        eval_accuracy = (eval_chosen > eval_rejected).float().mean().item()
    reference_scores = torch.cat([train_chosen, train_rejected])
    setattr(model.config, REWARD_MEAN_KEY, reference_scores.mean().item())
    setattr(model.config, REWARD_STD_KEY, max(reference_scores.std().item(), 1e-6))
    save_checkpoint(model, tokenizer, uri)
    log_metrics(
        {
            "train_accuracy": train_accuracy,
            "eval_accuracy": eval_accuracy,
            "reference_mean": reference_scores.mean().item(),
            "reference_std": reference_scores.std().item(),
        }
    )
    log.info("reward model: train accuracy %.3f, held-out accuracy %.3f", train_accuracy, eval_accuracy)
    return Outputs(
        reward_model=uri,
        eval_accuracy=eval_accuracy,
        train_accuracy=train_accuracy,
        num_train_pairs=len(data.train),
    )
