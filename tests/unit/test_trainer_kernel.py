"""The trainer kernel against the per-trainer code it replaced, written out here as it stood in each trainer:
accumulation, clipping, the optimizer and the schedule; then its checkpoints, SIGTERM, and pair batches."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_components import dpo, ppo, train_reward_model
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import TrackingServerDown
from rlhf_components.core.trainer import Kernel, pair_batches, require_pairs
from rlhf_components.distributed.collectives import Workers


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def fixed_batch(rows: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    inputs = torch.randn(rows, 4, generator=generator)
    return inputs, inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.25


def mse(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((model(inputs).squeeze(-1) - targets) ** 2).mean()


def recorded_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every gradient the optimizer is about to apply, flattened, one entry per optimizer step (Adam
    forgives a gradient scaled by a constant; this record does not)."""
    record: list[torch.Tensor] = []

    def before_step(optimizer: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad.reshape(-1) for group in optimizer.param_groups for p in group["params"]]
        record.append(torch.cat(grads).clone())

    optimizer.register_step_pre_hook(before_step)
    return record


def assert_same_parameters(actual: torch.nn.Module, expected: torch.nn.Module, atol: float) -> None:
    for (name, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.allclose(a, e, atol=atol), (name, float((a - e).abs().max()))


def test_ppo_accumulation_and_schedule_equal_the_old_ppo_update() -> None:
    """Old PPO: per minibatch, zero the gradients, backward loss/A for each of A micro-batches, clip, step;
    the LambdaLR schedule stepped once per iteration."""
    config = ppo.Config(learning_rate=0.05, max_grad_norm=9.5)
    iterations, minibatches, blocks = 3, 2, 3
    inputs, targets = fixed_batch()
    micro = [slice(i * 2, i * 2 + 2) for i in range(6)]  # minibatch m, block b: micro[m * blocks + b]

    old = small_model()
    parameters = list(old.parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, eps=config.adam_eps, weight_decay=config.weight_decay, fused=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / iterations)
    old_gradients = recorded_gradients(optimizer)
    old_rates = []
    for _ in range(iterations):
        for minibatch in range(minibatches):
            optimizer.zero_grad(set_to_none=True)
            for block in range(blocks):
                rows = micro[minibatch * blocks + block]
                (mse(old, inputs[rows], targets[rows]) / blocks).backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
        schedule.step()
        old_rates.append(schedule.get_last_lr()[0])

    new = small_model()
    kernel = Kernel(
        config,
        {"model": new},
        Workers(),
        iterations * minibatches,
        "unused",
        "ppo",
        accumulation_steps=blocks,
        hold=minibatches,
    )
    new_gradients = recorded_gradients(kernel.optimizer)
    new_rates, stepped = [], []
    for _ in range(iterations):
        for minibatch in range(minibatches):
            for block in range(blocks):
                rows = micro[minibatch * blocks + block]
                stepped.append(kernel.step(mse(new, inputs[rows], targets[rows])))
        new_rates.append(kernel.learning_rate)

    assert stepped == [False, False, True] * (iterations * minibatches)
    assert new_rates == pytest.approx(old_rates, abs=1e-12)
    assert len(new_gradients) == len(old_gradients) == iterations * minibatches
    clipped = 0
    for new_gradient, old_gradient in zip(new_gradients, old_gradients, strict=True):
        assert torch.allclose(new_gradient, old_gradient, atol=1e-7)
        clipped += bool(abs(float(old_gradient.norm()) - config.max_grad_norm) < 1e-4)
    assert 0 < clipped < len(old_gradients), "some steps were clipped, some not"
    assert_same_parameters(new, old, atol=1e-7)
    assert not torch.allclose(new[0].weight, small_model()[0].weight, atol=1e-2), "the weights moved"


@pytest.mark.parametrize("trainer", [train_reward_model, dpo])
def test_pair_trainer_steps_equal_the_old_pair_trainer_update(trainer: object) -> None:
    """Old reward model and DPO: zero the gradients, backward loss × share, clip, step, and the schedule
    1 − step/total after every step (the reward model's AdamW was not fused: equal to float tolerance)."""
    config = trainer.Config(learning_rate=0.05, max_grad_norm=12.0)  # type: ignore[attr-defined]
    inputs, targets = fixed_batch()
    batches = [slice(0, 5), slice(5, 10), slice(10, 12)]
    shares = [0.8, 1.25, 1.0]  # what a trainer scales its loss by: the kernel must not rescale it
    total = len(batches)

    old = small_model()
    parameters = list(old.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    old_gradients = recorded_gradients(optimizer)
    old_rates = []
    for rows, share in zip(batches, shares, strict=True):
        optimizer.zero_grad(set_to_none=True)
        (mse(old, inputs[rows], targets[rows]) * share).backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        old_rates.append(schedule.get_last_lr()[0])

    new = small_model()
    kernel = Kernel(config, {"model": new}, Workers(), total, "unused", "pairs")
    new_gradients = recorded_gradients(kernel.optimizer)
    new_rates = []
    for rows, share in zip(batches, shares, strict=True):
        assert kernel.step(mse(new, inputs[rows], targets[rows]) * share)
        new_rates.append(kernel.learning_rate)

    assert new_rates == pytest.approx(old_rates, abs=1e-12) and new_rates[-1] == pytest.approx(0.0)
    for new_gradient, old_gradient in zip(new_gradients, old_gradients, strict=True):
        assert torch.allclose(new_gradient, old_gradient, atol=1e-7)
    assert_same_parameters(new, old, atol=1e-6)


def _kernel(model: torch.nn.Module, uri: Path, log: Any = None, **config: object) -> Kernel:
    config = train_reward_model.Config(learning_rate=0.05, **config)
    log = log or (lambda metrics, step: None)
    return Kernel(config, {"model": model}, Workers(), 6, str(uri), "rm", log=log)


def _train(kernel: Kernel, model: torch.nn.Module, steps: range) -> None:
    inputs, targets = fixed_batch()
    for step in steps:
        rows = slice(2 * (step % 6), 2 * (step % 6) + 2)
        kernel.step(mse(model, inputs[rows], targets[rows]) + 0.01 * torch.randn(()))  # uses torch's RNG
        metrics = kernel.reduce({"loss": 0.0})
        kernel.completed(step + 1, 6, metrics, {"seen": step + 1}, {"marker": torch.tensor([float(step)])})


def test_a_resumed_kernel_continues_exactly_where_the_checkpoint_left_off(tmp_path: Path) -> None:
    torch.manual_seed(7)
    whole = small_model()
    _train(_kernel(whole, tmp_path / "whole"), whole, range(6))

    torch.manual_seed(7)
    first = small_model()
    _train(_kernel(first, tmp_path / "cut", checkpoint_every=2), first, range(3))  # saved after step 2
    torch.manual_seed(123)  # a restarted process: its RNG is restored from the checkpoint
    second = small_model(seed=5)  # other weights: restored from the checkpoint too
    kernel = _kernel(second, tmp_path / "cut", checkpoint_every=2)
    resumed = kernel.resume()
    assert (resumed.done, resumed.state) == (2, {"seen": 2})
    assert torch.equal(resumed.tensors["marker"], torch.tensor([1.0]))
    assert kernel.learning_rate == pytest.approx(0.05 * (1 - 2 / 6))
    _train(kernel, second, range(2, 6))
    for a, b in zip(second.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    # The last periodic checkpoint (after step 4) stays; none is written after the last step.
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["latest.json", "step-00000004"]


def test_a_checkpoint_of_another_config_is_refused_unless_resume_is_off(tmp_path: Path) -> None:
    model = small_model()
    _train(_kernel(model, tmp_path, checkpoint_every=1), model, range(2))
    with pytest.raises(UserError, match="written with a different rm config; set resume: false"):
        _kernel(small_model(), tmp_path, max_grad_norm=0.1).resume()
    assert _kernel(small_model(), tmp_path, max_grad_norm=0.1, resume=False).resume().done == 0
    # Workers, device and checkpoint frequency are not part of the fingerprint.
    assert _kernel(small_model(), tmp_path, checkpoint_every=5, device="cpu").resume().done == 2


def test_sigterm_checkpoints_after_the_step_then_stops_with_one_line(tmp_path: Path) -> None:
    model = small_model()
    inputs, targets = fixed_batch()
    with _kernel(model, tmp_path) as kernel:
        kernel.step(mse(model, inputs, targets))
        kernel.completed(1, 6, kernel.reduce({}))
        os.kill(os.getpid(), signal.SIGTERM)  # only raises a flag: training goes on to the step's end
        kernel.step(mse(model, inputs, targets))
        metrics = kernel.reduce({})
        assert metrics["learning_rate"] == pytest.approx(0.05 * 4 / 6)
        with pytest.raises(UserError, match=r"^rm: stopped by SIGTERM after step 2/6; run it again"):
            kernel.completed(2, 6, metrics)
    assert (tmp_path / "latest.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_tracking_server_that_stays_down_costs_no_progress(tmp_path: Path) -> None:
    logged: list[int] = []
    down = "MLflow tracking server http://m did not answer for 60 s (Connection refused)"

    def log(metrics: dict[str, float], step: int) -> None:
        if step == 3:
            raise TrackingServerDown(down)
        logged.append(step)

    torch.manual_seed(7)
    model = small_model()
    with pytest.raises(UserError) as raised, _kernel(model, tmp_path / "run", log=log) as kernel:
        _train(kernel, model, range(6))
    assert logged == [1, 2]
    assert str(raised.value) == (
        f"rm: {down}; the progress after step 3/6 is saved in {tmp_path / 'run'}, and a retry of this run "
        "resumes from it"
    )
    resumed_model = small_model(seed=5)
    resumed = _kernel(resumed_model, tmp_path / "run").resume()
    assert (resumed.done, resumed.state) == (3, {"seen": 3})
    torch.manual_seed(7)
    reference = small_model()
    _train(_kernel(reference, tmp_path / "reference"), reference, range(3))
    assert_same_parameters(resumed_model, reference, atol=0.0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pair_batches_cover_every_pair_once_per_epoch_and_weight_the_shares(world_size: int) -> None:
    config = dpo.Config(batch_size=8, epochs=2, workers=world_size)
    count = 21  # 8 + 8 + 5
    per_rank = [
        list(pair_batches(count, config, Workers(rank, world_size), seed=3, done=0))
        for rank in range(world_size)
    ]
    assert [len(batches) for batches in per_rank] == [6] * world_size
    for step in range(6):
        rows = [row for batches in per_rank for row in batches[step].rows]
        size = per_rank[0][step].size
        assert len(rows) == size == (5 if step % 3 == 2 else 8)
        weights = [batches[step].weight for batches in per_rank]
        assert sum(weights) == pytest.approx(world_size)  # the mean of weighted means is the batch's mean
        for batches in per_rank:
            assert batches[step].weight == pytest.approx(len(batches[step].rows) * world_size / size)
    for epoch in range(2):
        seen = [row for batches in per_rank for b in batches[epoch * 3 : epoch * 3 + 3] for row in b.rows]
        assert sorted(seen) == list(range(count))
    # Resuming after step 4 walks the same remaining batches.
    again = list(pair_batches(count, config, Workers(0, world_size), seed=3, done=4))
    assert again == per_rank[0][4:]
    assert [b.rows for b in pair_batches(count, config, Workers(0, world_size), seed=4, done=0)] != [
        b.rows for b in per_rank[0]
    ]


def test_pairs_that_leave_a_worker_without_a_pair_are_a_user_error() -> None:
    config = dpo.Config(batch_size=8, workers=4)
    require_pairs(20, "pairs.jsonl", config, Workers(0, 4), "dpo")  # 8 + 8 + 4
    with pytest.raises(UserError, match=r"^pairs\.jsonl: no training pairs"):
        require_pairs(0, "pairs.jsonl", config, Workers(0, 4), "dpo")
    with pytest.raises(UserError, match=r"17 training pairs in batches of 8 leave a batch of 1 for 4 "):
        require_pairs(17, "pairs.jsonl", config, Workers(0, 4), "dpo")


def _saved(tmp_path: Path) -> Path:
    model = small_model()
    _train(_kernel(model, tmp_path, checkpoint_every=1), model, range(2))
    return tmp_path / "step-00000002"


def _rewrite_tensors(folder: Path, change: Any) -> None:
    """Change the tensors file and record its new checksum: only the content is wrong, not the file."""
    tensors = load_file(str(folder / "tensors.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "tensors.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    state["tensors_sha256"] = hashlib.sha256((folder / "tensors.safetensors").read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda f: (f / "tensors.safetensors").write_bytes(
                (f / "tensors.safetensors").read_bytes()[:-100]
            ),
            "does not match its sha256",
        ),
        (
            lambda f: (f / "tensors.safetensors").write_bytes(
                (lambda b: b[:-1] + bytes([b[-1] ^ 1]))((f / "tensors.safetensors").read_bytes())
            ),
            "does not match its sha256",
        ),
        (lambda f: (f / "state.json").write_text("{"), "state.json is not JSON"),
        (lambda f: (f / "tensors.safetensors").unlink(), "tensors.safetensors is missing"),
        (
            lambda f: (f.parent / "latest.json").write_text(
                json.dumps({"step": 2, "directory": "../../elsewhere"})
            ),
            "points at '../../elsewhere', not at a step folder",
        ),
        (lambda f: _rewrite_tensors(f, lambda t: t.pop("model.0.weight")), "missing model.0.weight"),
        (
            lambda f: _rewrite_tensors(f, lambda t: t.update({"model.0.weight": torch.zeros(3, 3)})),
            "size mismatch for model.0.weight",
        ),
    ],
)
def test_a_damaged_checkpoint_is_one_line_that_says_what_and_to_set_resume_false(
    tmp_path: Path, damage: Any, problem: str
) -> None:
    damage(_saved(tmp_path))
    one_line = rf"^[^\n]*the checkpoint is damaged \(.*({problem}).*\); set resume: false[^\n]*$"
    with pytest.raises(UserError, match=one_line):
        _kernel(small_model(), tmp_path).resume()
