"""Distributed training on torch.distributed: N workers started by torchrun (real processes, gloo) through
the launcher's own code, checked against one process and against the definitions written here."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from rlhf_components import dpo, ppo, train_reward_model
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets
from rlhf_components.distributed import launch
from rlhf_components.distributed.collectives import Workers
from rlhf_components.distributed.launcher import run_workers, torchrun_command

from . import distributed_worker as worker
from ._helpers import child_runs, sentiment_pairs, tiny_reward_model, write_jsonl

pytestmark = pytest.mark.slow

WORKER = str(Path(worker.__file__))


def torchrun(mode: str, out: Path, *args: str) -> None:
    command = [*torchrun_command(2), WORKER, mode, str(out), *args]
    run_workers(f"test-{mode}", command, 2, out.parent / "errors")


def assert_same_weights(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float
) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        gap = (actual[key] - expected[key]).abs().max()
        assert torch.allclose(actual[key], expected[key], atol=atol), (key, gap)


def ppo_steps(
    mode: str, step: Callable[..., dict[str, torch.Tensor]], tmp_path: Path, assets: DemoAssets, reward: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the weights after one PPO step of 2 torchrun workers in `mode`, after `step` in one process with
    accumulation 2 over all the prompts)."""
    torchrun(mode, tmp_path / "two.safetensors", assets.sft_model_dir, reward)
    one_process = step(assets.sft_model_dir, reward, worker.ppo_config(workers=1, accumulation=2), Workers())
    return load_file(tmp_path / "two.safetensors"), one_process


def test_two_workers_take_the_ppo_step_of_one_process_with_their_rollouts(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_assets: DemoAssets
) -> None:
    """Worker r answers half of the prompts; one process with accumulation 2 answers all of them."""
    reward = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    two_workers, one_process = ppo_steps("ppo", worker.ppo_step, tmp_path, tiny_assets, reward)
    initial = worker.load_weights(tiny_assets.sft_model_dir, reward)
    # The update moved the weights well beyond the tolerance, so the equality below is not trivial.
    assert max(float((one_process[k] - initial[k]).abs().max()) for k in initial) > 1e-3
    assert_same_weights(two_workers, one_process, atol=2e-5)


def test_two_workers_take_the_lora_ppo_step_of_one_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_assets: DemoAssets
) -> None:
    """The same with LoRA: only the adapters and the value head are all-reduced, and they end alike."""
    reward = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    two_workers, one_process = ppo_steps("ppo-lora", worker.ppo_lora_step, tmp_path, tiny_assets, reward)
    assert two_workers and all("lora_" in key or "modules_to_save" in key for key in two_workers)
    moved = max(float(t.abs().max()) for k, t in one_process.items() if "lora_B" in k)
    assert moved > 1e-4, "the adapters left zero, so the equality below is not trivial"
    assert_same_weights(two_workers, one_process, atol=2e-5)


def test_parameter_averaging_every_k_steps_matches_its_definition(tmp_path: Path) -> None:
    torchrun("average", tmp_path / "average.safetensors")
    # θ ← mean_i θ_i after every 2 local SGD steps, each worker on its own data, written out by hand.
    models = [worker.linear_model() for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(4):
        for rank, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            worker.local_sgd_step(model, optimizer, rank, step)
        if step % 2 == 1:
            with torch.no_grad():
                for parameters in zip(*(m.parameters() for m in models), strict=True):
                    mean = sum(p.clone() for p in parameters) / 2
                    for p in parameters:
                        p.copy_(mean)
    expected = {k: v for k, v in models[0].state_dict().items()}
    assert not torch.allclose(expected["weight"], worker.linear_model().weight)
    assert_same_weights(load_file(tmp_path / "average.safetensors"), expected, atol=1e-6)


def test_the_kernel_on_two_workers_takes_the_old_single_process_step_on_both_shards(tmp_path: Path) -> None:
    """Each worker's kernel sees its own rows; one process of the old trainer code sees both at once."""
    torchrun("kernel", tmp_path / "kernel.safetensors")
    config = worker.kernel_config(1)
    model = worker.linear_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 4)
    shards = [worker.linear_shards(rank) for rank in range(2)]
    for step in range(4):
        rows = worker.rows_of_step(step)
        inputs = torch.cat([shard[0][rows] for shard in shards])
        targets = torch.cat([shard[1][rows] for shard in shards])
        optimizer.zero_grad(set_to_none=True)
        ((model(inputs).squeeze(-1) - targets) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
    assert not torch.allclose(model.weight, worker.linear_model().weight, atol=1e-2)
    assert_same_weights(load_file(tmp_path / "kernel.safetensors"), model.state_dict(), atol=1e-6)


def test_a_crashing_worker_fails_the_job_with_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"test-crash: worker 1 of 2 failed: ValueError: rank 1 broke"):
        torchrun("crash", tmp_path / "unused")


def test_a_stuck_collective_times_out_instead_of_hanging(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(UserError, match=r"worker 0 of 2 failed: .*[Tt]imed? ?out"):
        torchrun("hang", tmp_path / "unused")
    assert time.monotonic() - started < 60  # the sleeping worker would have held it for 120 s


def visible_to_bradley_terry(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without those whose gradient is exactly zero: the final layer norm's bias shifts every
    score alike, and attention's key bias shifts every logit alike, so the loss cannot see them. Their
    gradients are float noise, which Adam scales up to learning-rate-sized steps; one process already
    moves them differently on 1 and 2 threads."""
    return without_key_bias({k: v for k, v in weights.items() if k != "transformer.ln_f.bias"})


def test_reward_training_on_two_workers_equals_one_process(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(21, seed=3))  # 8 + 8 + 5: a ragged end
    evaluation = write_jsonl(tmp_path / "eval.jsonl", sentiment_pairs(6, seed=4))
    inputs = train_reward_model.Inputs(
        base_model=tiny_assets.sft_model_dir, train=str(train), eval=str(evaluation)
    )
    config = train_reward_model.Config(epochs=1, learning_rate=1e-3, batch_size=8, max_length=64)

    def trained(
        root: str, **distributed: object
    ) -> tuple[train_reward_model.Outputs, dict[str, torch.Tensor]]:
        context = run_context.model_copy(update={"output_root": str(tmp_path / root)})
        outputs = launch("train_reward_model", config.model_copy(update=distributed), inputs, context)
        return outputs, load_file(Path(outputs.reward_model) / "model.safetensors")

    alone, alone_weights = trained("alone")
    pair, pair_weights = trained("pair", launcher="torchrun", workers=2)
    assert_same_weights(visible_to_bradley_terry(pair_weights), visible_to_bradley_terry(alone_weights), 1e-5)
    assert pair.eval_accuracy == pytest.approx(alone.eval_accuracy)
    # One MLflow run per step however many workers: rank 0 logs the job's reduced metrics.
    runs = child_runs(run_context, "train_reward_model")
    assert len(runs) == 2
    for run in runs:
        assert {"train_accuracy", "eval_accuracy", "loss"} <= set(run.data.metrics)


def test_dpo_on_two_workers_equals_one_process(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(21, seed=5))  # 8 + 8 + 5: a ragged end
    evaluation = write_jsonl(tmp_path / "eval.jsonl", sentiment_pairs(4, seed=6))
    inputs = dpo.Inputs(policy=tiny_assets.sft_model_dir, train=str(train), eval=str(evaluation))
    config = dpo.Config(batch_size=8, learning_rate=1e-3, max_length=64)

    def trained(root: str, **distributed: object) -> dict[str, torch.Tensor]:
        context = run_context.model_copy(update={"output_root": str(tmp_path / root)})
        outputs = launch("dpo", config.model_copy(update=distributed), inputs, context)
        return load_file(Path(outputs.policy) / "model.safetensors")

    alone, pair = trained("alone"), trained("pair", launcher="torchrun", workers=2)
    # Attention's key bias gets an exactly zero gradient (see visible_to_bradley_terry): compare the rest.
    assert_same_weights(without_key_bias(pair), without_key_bias(alone), 1e-5)


def without_key_bias(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kept = dict(weights)
    for key in [k for k in kept if k.endswith("attn.c_attn.bias")]:
        query, _, value = kept[key].chunk(3)
        kept[key] = torch.cat([query, value])
    return kept


def test_ppo_resumes_a_two_worker_checkpoint_with_one_worker(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    reward = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    inputs = ppo.Inputs(
        policy=tiny_assets.sft_model_dir, reward_model=reward, prompts=tiny_assets.prompts_file
    )
    config = ppo.Config(
        total_episodes=16,
        rollout_batch_size=8,
        num_minibatches=2,
        ppo_epochs=1,
        checkpoint_every=1,
        launcher="torchrun",
        workers=2,
    )
    launch("ppo", config, inputs, run_context)
    checkpoint = Path(run_context.output_root, run_context.parent_run_id, "ppo", "checkpoint", "latest.json")
    assert checkpoint.is_file()  # written by rank 0 after iteration 1 of 2

    alone = config.model_copy(update={"launcher": "local", "workers": 1})
    assert launch("ppo", alone, inputs, run_context).iterations == 2
    first, second = sorted(child_runs(run_context, "ppo"), key=lambda run: run.info.start_time)
    history = mlflow.MlflowClient().get_metric_history
    assert [m.step for m in history(first.info.run_id, "score")] == [1, 2]
    assert [m.step for m in history(second.info.run_id, "score")] == [2]  # resumed after iteration 1


def test_worker_counts_the_data_cannot_feed_are_config_errors() -> None:
    with pytest.raises(ValueError, match="workers × num_minibatches"):
        ppo.Config(rollout_batch_size=8, num_minibatches=4, workers=4)
    with pytest.raises(ValueError, match=r"batch_size \(2\) must be at least workers"):
        train_reward_model.Config(batch_size=2, workers=4)
    with pytest.raises(UserError, match="need launcher torchrun, trainjob or pytorchjob"):
        launch(
            "ppo",
            ppo.Config(workers=2),
            ppo.Inputs(policy="p", reward_model="r", prompts="x"),
            RunContext(tracking_uri="sqlite://", experiment="e", parent_run_id="p", output_root="o"),
        )
