"""Inside a worker: its rank, and the collectives a trainer needs (torch.distributed: gloo or nccl).

torchrun and the Training Operator's PyTorchJob both start workers with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment; `join` reads them. Without them a trainer runs alone and every collective
here is the identity, so trainers have one code path.

Two ways to combine the workers' updates (`sync`):
- allreduce: after each backward pass the gradients are averaged, so every worker takes the same step and
  N workers equal one process that sees the same global batch;
- average_every_k: each worker takes k optimizer steps on its own shard, then θ ← mean over workers of θᵢ
  (and once more at the end), with optimizer states left per worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from rlhf_components.core.runtime import process_rank
from rlhf_components.distributed.config import Distributed

log = logging.getLogger(__name__)


@dataclass
class Workers:
    rank: int = 0
    world_size: int = 1
    sync: str = "allreduce"
    average_every: int = 1
    communication_seconds: float = field(default=0.0)
    """time spent in collectives so far (benchmarks/distributed.py reports it per step)"""
    optimizer_steps: int = field(default=0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, count: int) -> slice:
        """This worker's contiguous part of `count` items split as evenly as possible."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over workers (a new tensor; the input is left alone)."""
        total = tensor.detach().clone()
        if self.distributed:
            started = time.perf_counter()
            dist.all_reduce(total)
            self.communication_seconds += time.perf_counter() - started
        return total

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over workers, so rank 0 logs the whole job's numbers."""
        if not self.distributed:
            return metrics
        keys = sorted(metrics)
        values = self.sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64)) / self.world_size
        return dict(zip(keys, values.tolist(), strict=True))

    def _average(self, tensors: list[torch.Tensor]) -> None:
        flat = self.sum(torch.cat([t.reshape(-1) for t in tensors])) / self.world_size
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    @torch.no_grad()
    def after_backward(self, parameters: Iterable[torch.Tensor]) -> None:
        """allreduce: average the gradients (one flat all-reduce) before clipping and the optimizer step."""
        if self.distributed and self.sync == "allreduce":
            parameters = list(parameters)
            for parameter in parameters:
                if parameter.grad is None:  # a worker whose shard missed it still takes part
                    parameter.grad = torch.zeros_like(parameter)
            self._average([p.grad for p in parameters if p.grad is not None])

    @torch.no_grad()
    def after_step(self, parameters: Iterable[torch.Tensor]) -> None:
        """Count an optimizer step; average_every_k: after every k-th, θ ← mean over workers of θᵢ."""
        self.optimizer_steps += 1
        averaging = self.distributed and self.sync == "average_every_k"
        if averaging and self.optimizer_steps % self.average_every == 0:
            self._average([p.data for p in parameters])

    @torch.no_grad()
    def finish(self, parameters: Iterable[torch.Tensor]) -> None:
        """average_every_k: one last average, so every worker ends with the same weights."""
        if self.distributed and self.sync == "average_every_k":
            self._average([p.data for p in parameters])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def join(config: Distributed, device: torch.device) -> Workers:
    """Join the process group that torchrun or PyTorchJob set up, or run alone without one. Workers on GPUs
    reduce GPU tensors with NCCL and the CPU ones (metrics) with gloo; CPU workers use gloo alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    if world_size > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.collective_timeout_seconds))
        log.info("worker %d of %d joined (%s, sync %s)", rank, world_size, backend, config.sync)
    return Workers(rank, world_size, config.sync, config.average_every)


def leave(workers: Workers) -> None:
    if workers.distributed and dist.is_initialized():
        dist.destroy_process_group()
