"""Direct Preference Optimization (Rafailov et al. 2023), top to bottom in one file.

The policy learns from preference pairs directly, against a frozen reference policy (the SFT model):

1. reference — the reference's log-probability of every chosen and rejected response is computed once, in
               one pass, and the reference is then freed: it never shares memory with training;
2. optimise  — for each batch, the policy's log-probabilities log π(y|x), summed over response tokens only
               (prompt and pad tokens never count), give the implicit rewards r = β·(log π − log π_ref) and
               h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r). The loss is one of:
               sigmoid  −(1−ε)·log σ(β·h) − ε·log σ(−β·h)         (DPO; ε > 0: conservative DPO)
               robust   (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε)   (unbiased under label noise ε)
               hinge    max(0, 1 − β·h)                            (SLiC)
               ipo      (h − 1/(2β))²                              (IPO, on summed log-probs)
               plus sft_coef × the chosen responses' mean token NLL;
3. evaluate  — the same quantities on held-out pairs: loss, reward accuracy (r_c > r_r) and margin.

With several workers (rlhf_components.distributed) each scores its share of every global batch and the
gradients are averaged, as in reward-model training.
"""

from __future__ import annotations

import json
import logging
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_components.core import checkpoint, storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import encode_prompt_response, positions
from rlhf_components.core.models import load_policy, save_checkpoint
from rlhf_components.core.runtime import progress_disabled, seed_everything, select_device
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.distributed.collectives import join
from rlhf_components.dpo.config import Config, Inputs, Outputs

log = logging.getLogger(__name__)

Pair = dict[str, str]


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    config: Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, implicit reward of the chosen response, of the rejected one)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    beta, smoothing = config.beta, config.label_smoothing
    if config.loss == "sigmoid":
        loss = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    elif config.loss == "robust":
        loss = (-(1 - smoothing) * F.logsigmoid(beta * h) + smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * smoothing
        )
    elif config.loss == "hinge":
        loss = torch.relu(1 - beta * h)
    else:
        loss = (h - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


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
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], config: Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π of the chosen responses, of the rejected ones, token counts of the chosen): one forward pass."""
    prompts = [p["prompt"] for p in pairs]
    logps, counts = response_logps(
        model,
        tokenizer,
        prompts + prompts,
        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
        config,
    )
    return logps[: len(pairs)], logps[len(pairs) :], counts[: len(pairs)]


@torch.no_grad()
def reference_logps(
    reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], config: Config
) -> torch.Tensor:
    """[pairs, 2]: the reference's log π of each chosen and rejected response."""
    rows = []
    for start in range(0, len(pairs), config.batch_size):
        chosen, rejected, _ = pair_logps(
            reference, tokenizer, pairs[start : start + config.batch_size], config
        )
        rows.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 2, device=reference.device)


def _load_pairs(uri: str) -> list[Pair]:
    pairs = []
    for number, line in storage.read_jsonl(uri):
        record = json.loads(line)
        if not all(isinstance(record.get(key), str) for key in ("prompt", "chosen", "rejected")):
            raise UserError(
                f"{uri}:{number}: a preference pair needs text fields prompt, chosen and rejected"
            )
        pairs.append({key: record[key] for key in ("prompt", "chosen", "rejected")})
    return pairs


def _batch_loss(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    reference: torch.Tensor,
    config: Config,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the pairs, with the SFT term; per-pair statistics)."""
    chosen, rejected, chosen_tokens = pair_logps(policy, tokenizer, pairs, config)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, reference[:, 0], reference[:, 1], config
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


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "dpo", config):
        device = select_device(config.device, "dpo")
        workers = join(config, device)
        seed_everything(context.seed)
        train_pairs, eval_pairs = _load_pairs(inputs.train), _load_pairs(inputs.eval)
        if len(train_pairs) < max(1, workers.world_size):
            raise UserError(
                f"{inputs.train}: {len(train_pairs)} training pairs cannot feed "
                f"{workers.world_size} worker(s)"
            )
        policy, tokenizer = load_policy(inputs.policy, config.trust_remote_code, device)
        reference, _ = load_policy(inputs.reference or inputs.policy, config.trust_remote_code, device)
        reference.eval()
        started = time.perf_counter()
        reference_train = reference_logps(reference, tokenizer, train_pairs, config)
        reference_eval = reference_logps(reference, tokenizer, eval_pairs, config)
        del reference  # the reference's work is done: training holds one model
        log_metrics({"dpo_reference_seconds": time.perf_counter() - started})
        log.info(
            "dpo: reference log-probs of %d pairs in %.1f s",
            len(train_pairs) + len(eval_pairs),
            time.perf_counter() - started,
        )

        steps_per_epoch = -(-len(train_pairs) // config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(
            policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            (lambda i: 1.0 - i / total_steps) if config.lr_schedule == "linear" else (lambda i: 1.0),
        )
        checkpoint_uri = step_output(context, "dpo", "checkpoint")
        done = 0
        if config.resume and checkpoint.exists(checkpoint_uri):
            done = _restore(checkpoint_uri, config, policy, optimizer, schedule)
        policy.train()
        progress = tqdm(total=total_steps, initial=done, desc="dpo", disable=progress_disabled())
        with checkpoint.StopRequest() as stop:
            order, order_epoch = torch.empty(0, dtype=torch.long), -1
            for step in range(done, total_steps):
                epoch, position = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    # From (seed, epoch) alone: a resumed run needs no saved RNG state.
                    seeded = torch.Generator().manual_seed(context.seed * 1000 + epoch)
                    order, order_epoch = torch.randperm(len(train_pairs), generator=seeded), epoch
                global_batch = order[position * config.batch_size : (position + 1) * config.batch_size]
                rows = global_batch[workers.shard(len(global_batch))]
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss, stats = _batch_loss(
                    policy, tokenizer, [train_pairs[int(i)] for i in rows], reference_train[rows], config
                )
                (loss * len(rows) * workers.world_size / len(global_batch)).backward()
                workers.after_backward(policy.parameters())
                torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
                workers.after_step(policy.parameters())
                schedule.step()
                local = {f"dpo_{key}": value.mean().item() for key, value in stats.items()}
                local["stop_requested"] = float(stop.requested)
                metrics = workers.mean_metrics(local)
                stopping = metrics.pop("stop_requested") > 0
                metrics["dpo_pairs_per_second"] = len(global_batch) / (time.perf_counter() - started)
                metrics["dpo_learning_rate"] = schedule.get_last_lr()[0]
                log_metrics(metrics, step=step + 1)
                progress.set_postfix(
                    loss=f"{metrics['dpo_loss']:.3f}", acc=f"{metrics['dpo_reward_accuracy']:.2f}"
                )
                progress.update()
                periodic = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
                if stopping or (periodic and step + 1 < total_steps):
                    if workers.is_main:
                        _save(checkpoint_uri, step + 1, config, policy, optimizer, schedule)
                    workers.barrier()
                if stopping:
                    raise UserError(
                        f"dpo: stopped by SIGTERM after step {step + 1}/{total_steps}; "
                        f"run it again to resume from {checkpoint_uri}"
                    )
        progress.close()
        workers.finish(policy.parameters())
        policy.eval()
        outputs = Outputs(
            policy=step_output(context, "dpo", "policy"),
            steps=total_steps,
            eval_reward_accuracy=float("nan"),
            eval_reward_margin=float("nan"),
            eval_loss=float("nan"),
        )
        if workers.is_main:
            outputs = _evaluate(outputs, policy, tokenizer, eval_pairs, reference_eval, config)
            policy.generation_config.pad_token_id = tokenizer.pad_token_id
            save_checkpoint(policy, tokenizer, outputs.policy)
        workers.barrier()
        return outputs


@torch.no_grad()
def _evaluate(
    outputs: Outputs,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
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
    means = {f"dpo_eval_{key}": value / len(pairs) for key, value in totals.items()}
    log_metrics(means)
    log.info(
        "dpo: held-out reward accuracy %.3f, margin %.3f",
        means["dpo_eval_reward_accuracy"],
        means["dpo_eval_reward_margin"],
    )
    return outputs.model_copy(
        update={
            "eval_reward_accuracy": means["dpo_eval_reward_accuracy"],
            "eval_reward_margin": means["dpo_eval_reward_margin"],
            "eval_loss": means["dpo_eval_loss"],
        }
    )


def _save(
    uri: str,
    step: int,
    config: Config,
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
) -> None:
    optimizer_tensors, optimizer_rest = checkpoint.flatten_optimizer("optimizer", optimizer)
    tensors = {**checkpoint.prefixed("policy", policy.state_dict()), **optimizer_tensors}
    state = {
        "config": config.checkpoint_fingerprint(),
        "optimizer": optimizer_rest,
        "schedule": schedule.state_dict(),
    }
    checkpoint.save(uri, step, tensors, state)


def _restore(
    uri: str,
    config: Config,
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
) -> int:
    tensors, state = checkpoint.load(uri)
    if state["config"] != config.checkpoint_fingerprint():
        raise UserError(f"{uri}: checkpoint was written with a different dpo config; set resume: false")
    policy.load_state_dict(checkpoint.unprefixed("policy", tensors))
    checkpoint.restore_optimizer("optimizer", optimizer, tensors, state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    log.info("dpo: resumed from %s after step %d", uri, state["step"])
    return int(state["step"])
