"""Reward model training: Bradley–Terry on preference pairs, read at the answer's stop token.

The model is a backbone (the policy's by default, or `base`: any family, with its own tokenizer and chat
template) with a fresh scalar head (init N(0, 1/sqrt(d+1))), trained for one epoch by default with the
learning rate annealed linearly to zero. Afterwards its rewards are normalised so the reference policy's
answers (the ones annotators judged) score mean 0, std 1: PPO's KL coefficient then means the same thing
whatever the reward model. With several workers each scores its share of every global batch and the gradients
are averaged (core.trainer); a checkpoint resumes where a stopped run left off. With `lora:` (core.lora) the
backbone stays frozen and adapters train beside the head. A `pretrained` reward model is only scored on the
pairs and passed on as it is.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedModel

from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.errors import UserError
from rlhf_components.core.lora import add_adapters, save_and_merge
from rlhf_components.core.losses import bradley_terry_loss
from rlhf_components.core.models import (
    REWARD_MEAN_KEY,
    REWARD_STD_KEY,
    init_scalar_head,
    load_scalar_model,
    save_checkpoint,
    sequence_scores,
)
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.core.trainer import EncodedPair, Job, Pairs, encode_pairs, fit_pairs, start_training
from rlhf_components.train_reward_model.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

STEP = "train_reward_model"


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, STEP, config):
        if inputs.pretrained is not None:
            return _score_pretrained(inputs.pretrained, config, inputs, context)
        base = config.base or inputs.base_model
        if base is None:
            raise UserError(f"{STEP}: no backbone to train: set {STEP}.base, or give the base_model input")
        job = start_training(config, base, context.seed, STEP)
        model, fmt = _with_new_head(base, config, job)
        pairs = encode_pairs(fmt, config, inputs.train, inputs.eval, job)

        def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            chosen, rejected = _pair_scores(model, fmt, [pairs.train[row] for row in rows])
            loss = bradley_terry_loss(chosen, rejected, config.margin, config.center_rewards_coef)
            return loss, {"loss": loss.item(), "batch_accuracy": (chosen > rejected).float().mean().item()}

        kernel = fit_pairs(config, {"reward_model": model}, job, pairs, context, batch_loss)
        uri = step_output(context, STEP, "model")
        adapter = step_output(context, STEP, "adapter") if config.lora else None

        def save() -> Outputs:
            save_and_merge(model, adapter, base)
            saved = _normalise_and_save(model, fmt, pairs, config, uri, job.dtype)
            return saved.model_copy(update={"adapter": adapter})

        saved = kernel.finish(save)
        # Rank 0's outputs are the job's; the other workers' are never read.
        return saved or Outputs(
            reward_model=uri,
            eval_accuracy=math.nan,
            train_accuracy=math.nan,
            num_train_pairs=len(pairs.train),
        )


def _with_new_head(base: str, config: Config, job: Job) -> tuple[PreTrainedModel, ChatFormat]:
    """The backbone with a new scalar head, in float32 (the trainer's master weights); under LoRA a frozen
    backbone in the compute dtype with adapters, the head trained in float32."""
    model, fmt = load_scalar_model(base, config, dtype=job.dtype if config.lora else torch.float32)
    init_scalar_head(model)
    if config.lora:
        add_adapters(model, config.lora, STEP)
    return model.to(job.device), fmt


def _pair_scores(
    model: PreTrainedModel, fmt: ChatFormat, pairs: list[EncodedPair]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores of the chosen answers, of the rejected ones): one forward pass over both."""
    answers = [(prompt, chosen) for prompt, chosen, _ in pairs] + [
        (prompt, rejected) for prompt, _, rejected in pairs
    ]
    ids, mask, _ = (t.to(model.device) for t in fmt.right_padded(answers))
    scores = sequence_scores(model, ids, mask, mask.sum(-1) - 1)
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def _all_scores(
    model: PreTrainedModel, fmt: ChatFormat, pairs: list[EncodedPair], config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
    for start in range(0, len(pairs), config.batch_size * 4):
        c, r = _pair_scores(model, fmt, pairs[start : start + config.batch_size * 4])
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def _accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return (chosen > rejected).float().mean().item() if len(chosen) else math.nan


def _normalise_and_save(
    model: PreTrainedModel, fmt: ChatFormat, pairs: Pairs, config: Config, uri: str, dtype: torch.dtype
) -> Outputs:
    """Accuracies, the normalisation that makes the judged answers score mean 0 and std 1, and the
    checkpoint, all of the model as saved (in the input's dtype)."""
    torch.nn.Module.to(model, dtype)
    train_chosen, train_rejected = _all_scores(model, fmt, pairs.train, config)
    eval_chosen, eval_rejected = _all_scores(model, fmt, pairs.held_out, config)
    train_accuracy, eval_accuracy = (
        _accuracy(train_chosen, train_rejected),
        _accuracy(eval_chosen, eval_rejected),
    )
    reference_scores = torch.cat([train_chosen, train_rejected])
    setattr(model.config, REWARD_MEAN_KEY, reference_scores.mean().item())
    setattr(model.config, REWARD_STD_KEY, max(reference_scores.std().item(), 1e-6))
    save_checkpoint(model, fmt, uri)
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
        num_train_pairs=len(pairs.train),
    )


def _score_pretrained(uri: str, config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    """A trained reward model used as it is: its accuracy on this run's pairs, for the record and the gate."""
    job = start_training(config, uri, context.seed, STEP)
    model, fmt = load_scalar_model(uri, config, job.device)
    model.eval()
    pairs = encode_pairs(fmt, config, inputs.train, inputs.eval, job)
    train_accuracy = _accuracy(*_all_scores(model, fmt, pairs.train, config))
    eval_accuracy = _accuracy(*_all_scores(model, fmt, pairs.held_out, config))
    log_metrics({"train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy})
    log.info("pretrained reward model %s: held-out accuracy %.3f (not trained)", uri, eval_accuracy)
    return Outputs(
        reward_model=uri,
        eval_accuracy=eval_accuracy,
        train_accuracy=train_accuracy,
        num_train_pairs=len(pairs.train),
        trained=False,
    )
