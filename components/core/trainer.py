"""The trainer kernel: everything a trainer does around its loss, written once for every trainer.

A trainer starts (`start_training`: device, workers, seeds, dtype), loads its models, hands the ones it
trains to a `Kernel`, and keeps only its own loop (PPO), or only its loss when it walks batches of preference
pairs (`encode_pairs` + `fit_pairs`: reward model, DPO):

    with Kernel(config, {"policy": policy}, workers, total_steps, checkpoint_uri, "dpo") as kernel:
        resumed = kernel.resume()                           # done = 0 on a fresh start
        for step in range(resumed.done + 1, total_steps + 1):
            kernel.step(loss)                                # backward; every A-th call: one optimizer step
            metrics = kernel.reduce(local_metrics, weight)   # the job's numbers, on every worker
            kernel.completed(step, total_steps, metrics, state, tensors)  # logs; saves every N steps
    kernel.finish(save)                                      # rank 0 saves the result; every worker waits

- Optimizer: AdamW (fused) over every trained parameter that requires a gradient.
- Schedule: `linear` anneals the rate to 0 over the run, `constant` keeps it; `hold` optimizer steps share
  one rate (PPO changes its rate once per iteration, not once per minibatch).
- `step(loss)`: gradients of `loss / accumulation_steps` accumulate; on every `accumulation_steps`-th call
  they are averaged over workers (sync: allreduce), clipped to `max_grad_norm`, the optimizer and the
  schedule step, the gradients are cleared, and averaging every k steps happens (sync: average_every_k).
- Checkpoints (core.checkpoint: safetensors + JSON, the `latest.json` pointer last), one shape for every
  trainer: each model's trained parameters under its name (under LoRA: the adapters), the optimizer, the
  schedule, torch's RNG, the workers' step count, and the trainer's own `state` (JSON) and `tensors`, under
  the config's fingerprint. Only rank 0 writes; every worker then waits at a barrier. A tracking server that
  stays down past its retry window while a step's metrics are logged costs no progress: the checkpoint is
  written, then the run stops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from rlhf_components.core import checkpoint
from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.errors import UserError
from rlhf_components.core.models import compute_dtype
from rlhf_components.core.records import read_pairs
from rlhf_components.core.runtime import progress_disabled, seed_everything, select_device
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, TrackingServerDown, log_metrics
from rlhf_components.core.trainer_config import PairTrainerConfig, TrainerConfig
from rlhf_components.distributed.collectives import Workers, join

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Resumed:
    """Where a resumed run picks up: the progress it was saved after, and the trainer's own state."""

    done: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Kernel:
    """The optimizer, schedule, worker sync and checkpoints of one trainer's run (see the module's text)."""

    def __init__(
        self,
        config: TrainerConfig,
        models: dict[str, torch.nn.Module],
        workers: Workers,
        total_steps: int,
        checkpoint_uri: str,
        name: str,
        *,
        accumulation_steps: int = 1,
        hold: int = 1,
        unit: str = "step",
        compute_dtype: torch.dtype = torch.float32,
        log: Callable[[dict[str, float], int], None] = log_metrics,
    ) -> None:
        """`total_steps` optimizer steps in the whole run; `name` and `unit` word the messages
        ("ppo: stopped by SIGTERM after iteration 3/8"). The models' weights are the float32 master weights;
        inside `with kernel:` they compute under autocast in `compute_dtype` when that is narrower. `log`
        records each unit's metrics (MLflow, on rank 0)."""
        self.config = config
        self.log = log
        self.compute_dtype = compute_dtype
        self.models = models
        self.workers = workers
        self.checkpoint_uri = checkpoint_uri
        self.name = name
        self.unit = unit
        self.accumulation_steps = accumulation_steps
        self.parameters = [p for model in models.values() for p in model.parameters() if p.requires_grad]
        if config.gradient_checkpointing:
            for model in models.values():
                _recompute_activations(model, name)
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=config.learning_rate,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            fused=True,  # one kernel for all parameters: per-tensor Adam was 10% of a PPO iteration on a CPU
        )
        periods = max(1, total_steps // hold)
        linear = config.lr_schedule == "linear"
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda step: 1.0 - (step // hold) / periods) if linear else (lambda step: 1.0)
        )
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = 0
        self._communicated = 0.0
        self._stop = checkpoint.StopRequest()
        self._context = contextlib.ExitStack()
        self.stopping = False

    def __enter__(self) -> Kernel:
        self._context.enter_context(self._stop)
        if self.compute_dtype != torch.float32 and self.parameters:
            device_type = self.parameters[0].device.type
            self._context.enter_context(torch.autocast(device_type, dtype=self.compute_dtype))
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.close()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one part of a micro-batch's loss, freeing its activations at once;
        `step` takes the last part."""
        (loss / self.accumulation_steps).backward()

    def step(self, loss: torch.Tensor) -> bool:
        """Accumulate the gradient of `loss` (the micro-batch's, or its last part); returns whether this
        call took an optimizer step."""
        self.backward(loss)
        self._accumulated += 1
        if self._accumulated < self.accumulation_steps:
            return False
        self._accumulated = 0
        self.workers.after_backward(self.parameters)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.workers.after_step(self.parameters)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def learning_rate(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def reduce(self, local: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """The job's metrics: this worker's numbers times `weight` (its share of the global batch times the
        worker count; 1 when shares are equal), averaged over workers, so they are the global batch's own.
        Adds the time spent in collectives since the last call and the learning rate, and learns whether
        any worker was asked to stop (call it once per step, before `checkpoint`)."""
        communication = self.workers.communication_seconds - self._communicated
        weighted = {key: value * weight for key, value in local.items()}
        reduced = self.workers.mean_metrics(
            {
                **weighted,
                "communication_seconds": communication,
                "stop_requested": float(self._stop.requested),
            }
        )
        self._communicated = self.workers.communication_seconds
        self.stopping = reduced.pop("stop_requested") > 0
        return {**reduced, "learning_rate": self.learning_rate}

    def completed(
        self,
        done: int,
        total: int,
        metrics: dict[str, float],
        state: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Unit `done` of `total` is trained: log its metrics, then save every `checkpoint_every` units (not
        after the last: the result is saved then), and when a worker got SIGTERM, after which the run stops
        with one line. A tracking server that stays down saves the progress first, then stops the run."""
        try:
            self.log(metrics, done)
        except TrackingServerDown as down:
            if self.workers.is_main:  # only rank 0 logs, so only it gets here; its weights are everyone's
                self._save(done, state or {}, tensors or {})
            raise UserError(
                f"{self.name}: {down}; the progress after {self.unit} {done}/{total} is saved in "
                f"{self.checkpoint_uri}, and a retry of this run resumes from it"
            ) from None
        every = self.config.checkpoint_every
        if self.stopping or (every and done % every == 0 and done < total):
            if self.workers.is_main:
                self._save(done, state or {}, tensors or {})
            self.workers.barrier()
        if self.stopping:
            raise UserError(
                f"{self.name}: stopped by SIGTERM after {self.unit} {done}/{total}; "
                f"run it again to resume from {self.checkpoint_uri}"
            )

    def _save(self, done: int, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        optimizer_tensors, optimizer_rest = checkpoint.flatten_optimizer("optimizer", self.optimizer)
        weights = {
            key: value
            for name, model in self.models.items()
            for key, value in checkpoint.prefixed(name, dict(_trained(model))).items()
        }
        checkpoint.save(
            self.checkpoint_uri,
            done,
            {
                **weights,
                **optimizer_tensors,
                "rng.torch": torch.get_rng_state(),
                **checkpoint.prefixed("trainer", tensors),
            },
            {
                "config": self.config.checkpoint_fingerprint(),
                "optimizer": optimizer_rest,
                "schedule": self.schedule.state_dict(),
                "optimizer_steps": self.workers.optimizer_steps,
                "trainer": state,
            },
        )

    def resume(self) -> Resumed:
        """Load this run's checkpoint when there is one and `resume` is on; else a fresh start."""
        uri = self.checkpoint_uri
        if not (self.config.resume and checkpoint.exists(uri)):
            return Resumed()
        tensors, state = checkpoint.load(uri)
        if state.get("config") != self.config.checkpoint_fingerprint() or "trainer" not in state:
            raise UserError(
                f"{uri}: checkpoint was written with a different {self.name} config; set resume: false"
            )
        try:
            for name, model in self.models.items():
                saved = checkpoint.unprefixed(name, tensors)
                for key, parameter in _trained(model):
                    if key not in saved:
                        raise KeyError(f"missing {name}.{key}")
                    if saved[key].shape != parameter.shape:
                        raise ValueError(
                            f"size mismatch for {name}.{key}: {list(saved[key].shape)} saved, "
                            f"{list(parameter.shape)} in the model"
                        )
                    parameter.data.copy_(saved[key])
            checkpoint.restore_optimizer("optimizer", self.optimizer, tensors, state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.workers.optimizer_steps = int(state["optimizer_steps"])
            torch.set_rng_state(tensors["rng.torch"])
            resumed = Resumed(int(state["step"]), state["trainer"], checkpoint.unprefixed("trainer", tensors))
        except (KeyError, ValueError, TypeError, RuntimeError) as error:  # missing or misshapen entries
            raise checkpoint.Damaged(uri, f"{type(error).__name__}: {str(error)[:300]}") from None
        log.info("%s: resumed from %s after %s %d", self.name, uri, self.unit, resumed.done)
        return resumed

    def finish(self, save: Callable[[], T]) -> T | None:
        """The last parameter average (sync: average_every_k), then rank 0 runs `save` and returns its
        result (None elsewhere); every worker waits until it is written before reporting success."""
        self.workers.finish(self.parameters)
        result = save() if self.workers.is_main else None
        self.workers.barrier()
        return result


def policy_outputs(context: RunContext, section: str, config: TrainerConfig) -> dict[str, str | None]:
    """Where a policy trainer writes its policy, and under LoRA its adapter (TrainedPolicy's fields)."""
    return {
        "policy": step_output(context, section, "policy"),
        "policy_adapter": step_output(context, section, "policy_adapter") if config.lora else None,
    }


def units(section: str, done: int, total: int) -> tqdm[int]:
    """A trainer loop's units, done + 1 to total, with a progress bar that counts the done ones."""
    return tqdm(
        range(done + 1, total + 1), desc=section, disable=progress_disabled(), initial=done, total=total
    )


def _trained(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters a run changes, by name: all of them in full fine-tuning, the adapters (and a scalar
    head) under LoRA. Only these are checkpointed; the rest is the input checkpoint's, loaded again."""
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def _recompute_activations(model: torch.nn.Module, section: str) -> None:
    """Gradient (activation) checkpointing, under the name the installed transformers gives it (5.20
    renamed it)."""
    for method, argument in (
        ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
        ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
    ):
        enable = getattr(model, method, None)
        if callable(enable):
            enable(**{argument: {"use_reentrant": False}})
            return
    raise UserError(f"{section}.gradient_checkpointing: {type(model).__name__} does not support it")


@dataclass
class Job:
    """Where a trainer runs: its step's name, device, place among the workers, compute dtype, and the
    generator seeded for its data order."""

    section: str
    device: torch.device
    workers: Workers
    dtype: torch.dtype
    data_order: torch.Generator


def start_training(config: TrainerConfig, model_uri: str, seed: int, section: str) -> Job:
    """Pick the device, join the other workers, seed every RNG, and settle the dtype the trainer computes
    and saves in (`dtype: auto`: that of the checkpoint at `model_uri`)."""
    device = select_device(config.device, section)
    workers = join(config, device)
    data_order = seed_everything(seed)
    return Job(section, device, workers, compute_dtype(model_uri, config), data_order)


EncodedPair = tuple[list[int], list[int], list[int]]
"""(prompt ids, chosen answer ids, rejected answer ids), each answer ending with its stop token"""


@dataclass
class Pairs:
    train: list[EncodedPair]
    held_out: list[EncodedPair]


def encode_pairs(
    fmt: ChatFormat, config: PairTrainerConfig, train_uri: str, eval_uri: str, job: Job
) -> Pairs:
    """Read and encode the training and held-out pairs once. A pair longer than `max_length` (prompt and
    either answer) is dropped, never cut, and counted; the others must leave every worker a pair."""
    encoded: dict[str, list[EncodedPair]] = {}
    for split, uri in (("train", train_uri), ("eval", eval_uri)):
        pairs, dropped = [], 0
        for pair in read_pairs(uri):
            prompt, chosen = fmt.answer_ids(pair.prompt, pair.chosen)
            _, rejected = fmt.answer_ids(pair.prompt, pair.rejected)
            if len(prompt) + max(len(chosen), len(rejected)) > config.max_length:
                dropped += 1
            else:
                pairs.append((prompt, chosen, rejected))
        encoded[split] = pairs
        if dropped:
            log.warning(
                "%s: %d pairs of %s are longer than max_length %d: left out",
                job.section,
                dropped,
                uri,
                config.max_length,
            )
        log_metrics({f"{split}_pairs_too_long": dropped})
    require_pairs(len(encoded["train"]), train_uri, config, job.workers, job.section)
    return Pairs(encoded["train"], encoded["eval"])


BatchLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
"""(indices of this worker's training pairs in a batch) → (their mean loss, their mean metrics)"""


def fit_pairs(
    config: PairTrainerConfig,
    models: dict[str, torch.nn.Module],
    job: Job,
    pairs: Pairs,
    context: RunContext,
    batch_loss: BatchLoss,
) -> Kernel:
    """Train `models` over `config.epochs` of the training pairs in global batches: this worker's pairs of
    each batch → `batch_loss` (their mean loss and mean metrics) → one optimizer step; the
    job's metrics are logged every step, and `checkpoint_every` / SIGTERM checkpoint (a resumed run picks up
    at the next batch). Returns the kernel for its final `finish`."""
    total = config.total_steps(len(pairs.train))
    checkpoint_uri = step_output(context, job.section, "checkpoint")
    kernel = Kernel(config, models, job.workers, total, checkpoint_uri, job.section, compute_dtype=job.dtype)
    with kernel:
        done = kernel.resume().done
        for model in models.values():
            model.train()
        progress = tqdm(total=total, initial=done, desc=job.section, disable=progress_disabled())
        for batch in pair_batches(len(pairs.train), config, job.workers, context.seed, done):
            started = time.perf_counter()
            loss, local = batch_loss(batch.rows)
            kernel.step(loss * batch.weight)
            metrics = kernel.reduce(local, batch.weight)
            metrics["pairs_per_second"] = batch.size / (time.perf_counter() - started)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            progress.update()
            kernel.completed(batch.step, total, metrics)
        progress.close()
    for model in models.values():
        model.eval()
    return kernel


@dataclass(frozen=True)
class PairBatch:
    step: int
    """1-based optimizer step"""
    rows: list[int]
    """indices of this worker's pairs in the training set"""
    size: int
    """pairs in the global batch"""
    weight: float
    """this worker's share of the global batch times the worker count: a loss (or metric) that is the mean
    over its own pairs, times this weight and averaged over workers, is the global batch's mean"""


def pair_batches(
    count: int, config: PairTrainerConfig, workers: Workers, seed: int, done: int
) -> Iterator[PairBatch]:
    """The global batches of an epoch-wise shuffle of `count` pairs, from step `done + 1` to the last: every
    worker walks the same batches and takes its own contiguous part of each. Each epoch's order comes from
    (seed, epoch) alone, so a resumed run needs no saved data-order state."""
    steps_per_epoch = -(-count // config.batch_size)
    order, order_epoch = torch.empty(0, dtype=torch.long), -1
    for step in range(done, config.total_steps(count)):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            seeded = torch.Generator().manual_seed(seed * 1000 + epoch)
            order, order_epoch = torch.randperm(count, generator=seeded), epoch
        global_batch = order[position * config.batch_size : (position + 1) * config.batch_size]
        rows = global_batch[workers.shard(len(global_batch))].tolist()
        yield PairBatch(step + 1, rows, len(global_batch), len(rows) * workers.world_size / len(global_batch))


def require_pairs(count: int, uri: str, config: PairTrainerConfig, workers: Workers, section: str) -> None:
    """Every worker needs at least one pair of every global batch, the last and shortest of an epoch too."""
    if count == 0:
        raise UserError(f"{uri}: no training pairs")
    shortest = min(count, count % config.batch_size or config.batch_size)
    if shortest < workers.world_size:
        raise UserError(
            f"{uri}: {count} training pairs in batches of {config.batch_size} leave a batch of {shortest} "
            f"for {workers.world_size} workers; lower {section}.workers or change {section}.batch_size"
        )
