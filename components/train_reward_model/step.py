"""Reward model training: Bradley–Terry on preference pairs, read at the last real token.

The model is the policy's backbone with a fresh scalar head (init N(0, 1/sqrt(d+1))), trained for one epoch
by default with the learning rate annealed linearly to zero. Afterwards its rewards are normalised so the
reference policy's answers (the ones annotators judged) score mean 0, std 1: PPO's KL coefficient then means
the same thing whatever the reward model.
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import encode_prompt_response
from rlhf_components.core.models import (
    REWARD_MEAN_KEY,
    REWARD_STD_KEY,
    load_scalar_model,
    save_checkpoint,
    scalar_head,
    sequence_scores,
)
from rlhf_components.core.runtime import progress_disabled, seed_everything, select_device
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.distributed.collectives import join
from rlhf_components.train_reward_model.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, center_coef: float = 0.0
) -> torch.Tensor:
    """−log σ(r_c − r_r − margin), averaged, plus an optional pull of the pair's mean toward zero."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_coef > 0.0:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def encode_answers(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, index of the last real token) of prompt + response + EOS; see encode_prompt_response."""
    ids, mask, _ = encode_prompt_response(tokenizer, prompts, responses, max_length)
    return ids, mask, mask.sum(-1) - 1


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
) -> torch.Tensor:
    ids, mask, last = (t.to(model.device) for t in encode_answers(tokenizer, prompts, responses, max_length))
    return sequence_scores(model, ids, mask, last)


def _pair_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, str]], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [p["prompt"] for p in pairs]
    scores = score_texts(
        model,
        tokenizer,
        prompts + prompts,
        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
        max_length,
    )
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def _all_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, str]], config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for start in range(0, len(pairs), config.batch_size * 4):
        c, r = _pair_scores(model, tokenizer, pairs[start : start + config.batch_size * 4], config.max_length)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def _load_pairs(uri: str) -> list[dict[str, str]]:
    return [json.loads(line) for _, line in storage.read_jsonl(uri)]


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "train_reward_model", config):
        device = select_device(config.device, "train_reward_model")
        workers = join(config, device)
        generator = seed_everything(context.seed)
        train_pairs, eval_pairs = _load_pairs(inputs.train), _load_pairs(inputs.eval)
        if not train_pairs:
            raise UserError(f"{inputs.train}: no training pairs")
        if len(train_pairs) < workers.world_size:
            raise UserError(
                f"{inputs.train}: {len(train_pairs)} training pairs cannot be shared by {workers.world_size} "
                "workers; lower train_reward_model.workers"
            )
        model, tokenizer = load_scalar_model(inputs.base_model, config.trust_remote_code)
        head = scalar_head(model)
        with torch.no_grad():  # on the CPU, so the initial head is the same whatever the device
            head.weight.normal_(0.0, 1.0 / math.sqrt(model.config.hidden_size + 1))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
        model.to(device)

        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
        model.train()
        step = 0
        progress = tqdm(total=total_steps, desc="train_reward_model", disable=progress_disabled())
        for _ in range(config.epochs):
            order = torch.randperm(len(train_pairs), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                # Every worker walks the same global batches and scores its own part of each. Its loss is
                # its pairs' share of the global mean, so the averaged gradient is the global batch's.
                global_batch = order[start : start + config.batch_size]
                batch = [train_pairs[i] for i in global_batch[workers.shard(len(global_batch))]]
                optimizer.zero_grad(set_to_none=True)
                chosen, rejected = _pair_scores(model, tokenizer, batch, config.max_length)
                share = len(batch) * workers.world_size / len(global_batch)
                loss = bradley_terry_loss(chosen, rejected, config.margin, config.center_rewards_coef) * share
                loss.backward()
                workers.after_backward(model.parameters())
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                workers.after_step(model.parameters())
                schedule.step()
                step += 1
                totals = workers.sum(
                    torch.tensor([loss.item(), float((chosen > rejected).sum()), float(len(batch))])
                )
                metrics = {
                    "rm_communication_seconds": workers.communication_seconds,
                    "rm_loss": totals[0].item() / workers.world_size,
                    "rm_batch_accuracy": (totals[1] / totals[2]).item(),
                    "rm_lr": schedule.get_last_lr()[0],
                }
                log_metrics(metrics, step=step)
                progress.set_postfix(
                    loss=f"{metrics['rm_loss']:.3f}", acc=f"{metrics['rm_batch_accuracy']:.2f}"
                )
                progress.update()
        progress.close()
        workers.finish(model.parameters())
        model.eval()
        outputs = Outputs(
            reward_model=step_output(context, "train_reward_model", "model"),
            eval_accuracy=float("nan"),
            train_accuracy=float("nan"),
            num_train_pairs=len(train_pairs),
        )
        if not workers.is_main:  # rank 0 scores, normalises and saves; its outputs are the job's
            workers.barrier()
            return outputs

        train_chosen, train_rejected = _all_scores(model, tokenizer, train_pairs, config)
        train_accuracy = (train_chosen > train_rejected).float().mean().item()
        eval_accuracy = float("nan")
        if eval_pairs:
            eval_chosen, eval_rejected = _all_scores(model, tokenizer, eval_pairs, config)
            eval_accuracy = (eval_chosen > eval_rejected).float().mean().item()
        reference_scores = torch.cat([train_chosen, train_rejected])
        setattr(model.config, REWARD_MEAN_KEY, reference_scores.mean().item())
        setattr(model.config, REWARD_STD_KEY, max(reference_scores.std().item(), 1e-6))

        outputs = outputs.model_copy(
            update={"eval_accuracy": eval_accuracy, "train_accuracy": train_accuracy}
        )
        save_checkpoint(model, tokenizer, outputs.reward_model)
        log_metrics(
            {
                "rm_train_accuracy": train_accuracy,
                "rm_eval_accuracy": eval_accuracy,
                "rm_reference_mean": reference_scores.mean().item(),
                "rm_reference_std": reference_scores.std().item(),
            }
        )
        log.info("reward model: train accuracy %.3f, held-out accuracy %.3f", train_accuracy, eval_accuracy)
        workers.barrier()
        return outputs
