"""The worker side of tests/unit/test_distributed.py, started by torchrun through the launcher's own code.

    distributed_worker.py MODE OUT [ARGS...]

ppo SFT RM   one PPO update of this rank's share of a greedy rollout; rank 0 saves the weights to OUT
ppo-lora SFT RM   the same with LoRA; rank 0 saves the adapters and the value head
average      4 steps of a linear model on this rank's data, averaged every 2; rank 0 saves its weights
kernel       4 trainer-kernel steps of a linear model on this rank's data (allreduce); rank 0 saves
crash        rank 1 raises; rank 0 waits in a collective
hang         rank 1 never joins the collective that rank 0 waits in (timeout 3 s)
"""

from __future__ import annotations

import sys
import time

import torch
from safetensors.torch import save_file

from rlhf_components import ppo, train_reward_model
from rlhf_components.core.config import SamplingConfig
from rlhf_components.core.models import load_policy, load_scalar_model
from rlhf_components.core.step import recorded_errors
from rlhf_components.core.trainer import Kernel, start_training
from rlhf_components.core.trainer_config import Lora
from rlhf_components.distributed.collectives import Workers, join
from rlhf_components.distributed.config import Distributed
from rlhf_components.ppo.step import (
    Models,
    RewardScorer,
    _load_models,
    collect_rollout,
    ppo_kernel,
    ppo_update,
)

CPU = torch.device("cpu")

PPO_PROMPTS = [
    "Review of the ramen:",
    "Review of a small cafe near the station:",
    "My review of the lamp:",
    "Review of the tiny corner bakery on the main street:",
] * 2


def ppo_config(workers: int, accumulation: int) -> ppo.Config:
    return ppo.Config(
        workers=workers,
        rollout_batch_size=len(PPO_PROMPTS),
        num_minibatches=2,
        gradient_accumulation_steps=accumulation,
        ppo_epochs=2,
        kl_coef=0.1,
        learning_rate=1e-3,
        sampling=SamplingConfig(greedy=True, temperature=0.7, max_new_tokens=8),
    )


def weights(policy: torch.nn.Module, value_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        **{f"policy.{k}": v.detach().clone().contiguous() for k, v in policy.state_dict().items()},
        **{f"value.{k}": v.detach().clone().contiguous() for k, v in value_model.state_dict().items()},
    }


def load_weights(sft: str, reward: str) -> dict[str, torch.Tensor]:
    return weights(load_policy(sft)[0], load_scalar_model(reward)[0])


def ppo_step(sft: str, reward: str, config: ppo.Config, workers: Workers) -> dict[str, torch.Tensor]:
    """One rollout (of this worker's prompts) and one PPO update; returns policy and value weights."""
    torch.manual_seed(0)
    policy, fmt = load_policy(sft)
    reference, _ = load_policy(sft)
    reward_model, reward_fmt = load_scalar_model(reward)
    value_model, _ = load_scalar_model(reward)
    models = Models(policy, reference, RewardScorer(reward_model, reward_fmt, fmt), value_model, fmt)
    rollout_and_update(models, config, workers)
    return weights(policy, value_model)


def ppo_lora_step(sft: str, reward: str, config: ppo.Config, workers: Workers) -> dict[str, torch.Tensor]:
    """`ppo_step` with `lora:`, its models loaded as the trainer loads them; returns what trained."""
    config = config.model_copy(update={"lora": Lora(rank=4, alpha=8.0)})
    inputs = ppo.Inputs(policy=sft, reward_model=reward, prompts="unused")
    models = _load_models(inputs, config, start_training(config, sft, 0, "ppo"))
    rollout_and_update(models, config, workers)
    return {
        f"{role}.{name}": parameter.detach().clone().contiguous()
        for role, model in (("policy", models.policy), ("value", models.value_model))
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def rollout_and_update(models: Models, config: ppo.Config, workers: Workers) -> None:
    """A greedy rollout of this worker's share of the prompts, and one PPO update on it."""
    prompts = PPO_PROMPTS[workers.shard(len(PPO_PROMPTS))]
    query = models.fmt.left_padded([models.fmt.prompt_ids(prompt) for prompt in prompts])
    rollout = collect_rollout(
        models, query, prompts, config, config.kl_coef, torch.Generator().manual_seed(1), workers
    )
    kernel = ppo_kernel(config, models.policy, models.value_model, workers, 1, checkpoint_uri="unused")
    ppo_update(models.policy, models.value_model, kernel, rollout, config, torch.Generator().manual_seed(2))


def linear_shards(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own regression data."""
    generator = torch.Generator().manual_seed(100 + rank)
    inputs = torch.randn(16, 3, generator=generator)
    return inputs, inputs @ torch.tensor([1.0, -2.0, 0.5]) + rank


def linear_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def local_sgd_step(model: torch.nn.Linear, optimizer: torch.optim.Optimizer, rank: int, step: int) -> None:
    inputs, targets = linear_shards(rank)
    rows = slice(4 * step % 16, 4 * step % 16 + 4)
    optimizer.zero_grad()
    loss = ((model(inputs[rows]).squeeze(-1) - targets[rows]) ** 2).mean()
    loss.backward()
    optimizer.step()


def kernel_config(workers: int) -> train_reward_model.Config:
    return train_reward_model.Config(workers=workers, learning_rate=0.05, max_grad_norm=5.0)


def rows_of_step(step: int) -> slice:
    return slice(4 * step % 16, 4 * step % 16 + 4)


def kernel_steps(workers: Workers) -> dict[str, torch.Tensor]:
    """Four steps of the trainer kernel, each on this rank's rows of the step."""
    model = linear_model()
    kernel = Kernel(kernel_config(workers.world_size), {"model": model}, workers, 4, "unused", "test")
    inputs, targets = linear_shards(workers.rank)
    for step in range(4):
        rows = rows_of_step(step)
        kernel.step(((model(inputs[rows]).squeeze(-1) - targets[rows]) ** 2).mean())
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    with recorded_errors():
        if mode in {"ppo", "ppo-lora"}:
            workers = join(Distributed(workers=2), CPU)
            step = ppo_lora_step if mode == "ppo-lora" else ppo_step
            result = step(sys.argv[3], sys.argv[4], ppo_config(workers=2, accumulation=1), workers)
        elif mode == "average":
            workers = join(Distributed(workers=2, sync="average_every_k", average_every=2), CPU)
            model = linear_model()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            for step in range(4):
                local_sgd_step(model, optimizer, workers.rank, step)
                workers.after_step(model.parameters())
            result = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        elif mode == "kernel":
            workers = join(kernel_config(2), CPU)
            result = kernel_steps(workers)
        elif mode in {"crash", "hang"}:
            workers = join(Distributed(workers=2, collective_timeout_seconds=3), CPU)
            if workers.rank == 1:
                if mode == "crash":
                    raise ValueError("rank 1 broke on purpose")
                time.sleep(120)
            workers.sum(torch.ones(1))
            return
        else:
            raise SystemExit(f"unknown mode {mode}")
        if workers.is_main:
            save_file(result, out)


if __name__ == "__main__":
    main()
