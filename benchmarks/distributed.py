"""Distributed throughput: PPO and reward-model training on 1 and 2 torchrun workers (gloo) on the demo
model, with the time spent in collectives per step and the bytes each all-reduce moves. Prints JSON; never a
test.

    .venv/bin/python benchmarks/distributed.py -o benchmarks/results/distributed.json

Both worker counts go through torchrun, so start-up is alike; one worker gets every core, two get half each.
The first PPO iteration is a warm-up and is left out of the averages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PPO_SETTINGS, machine, our_ppo_config, prepare, prepare_pairs, write_result

PAIRS = 512
ITERATIONS = 6
PHASES = ("generation", "scoring", "training", "communication")


def measure(workers: int, paths: dict[str, str], root: Path) -> dict[str, Any]:
    import mlflow

    from rlhf_components import ppo, train_reward_model
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run
    from rlhf_components.distributed import launch

    tracking = TrackingConfig(uri=f"sqlite:///{root / f'mlflow-{workers}.db'}", experiment="distributed")
    uri, parent = start_pipeline_run(tracking, "distributed", {}, {})
    output_root = str(root / f"w{workers}")
    context = RunContext(
        tracking_uri=uri, experiment="distributed", parent_run_id=parent, output_root=output_root
    )
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("distributed").experiment_id

    def child_metrics(step: str, metric: str) -> list[float]:
        [run] = client.search_runs([experiment], filter_string=f"tags.`rlhf.step` = '{step}'")
        history = client.get_metric_history(run.info.run_id, metric)
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    pairs_file = prepare_pairs(PAIRS)
    rm_config = train_reward_model.Config(
        epochs=1, batch_size=32, learning_rate=5e-4, max_length=64, launcher="torchrun", workers=workers
    )
    started = time.perf_counter()
    launch(
        "train_reward_model",
        rm_config,
        train_reward_model.Inputs(base_model=paths["policy"], train=pairs_file, eval=pairs_file),
        context,
    )
    rm_seconds = time.perf_counter() - started
    rm_communication = child_metrics("train_reward_model", "communication_seconds")

    config = our_ppo_config(PPO_SETTINGS, PPO_SETTINGS["rollout_batch_size"] * ITERATIONS).model_copy(
        update={"launcher": "torchrun", "workers": workers}
    )
    inputs = ppo.Inputs(policy=paths["policy"], reward_model=paths["reward_model"], prompts=paths["prompts"])
    launch("ppo", config, inputs, context)

    def steady(metric: str) -> float:
        values = child_metrics("ppo", metric)
        return statistics.fmean(values[1:] or values)

    return {
        "workers": workers,
        "ppo_episodes_per_second": steady("episodes_per_second"),
        "ppo_seconds_per_iteration": {phase: steady(f"{phase}_seconds") for phase in PHASES},
        "reward_model_pairs_per_second_with_startup": PAIRS / rm_seconds,
        "reward_model_communication_seconds_per_step": statistics.fmean(rm_communication),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()

    from rlhf_components.core.models import load_policy, load_scalar_model
    from rlhf_components.core.runtime import setup_logging

    setup_logging("WARNING")
    paths = prepare("demo")
    policy_parameters = sum(p.numel() for p in load_policy(paths["policy"])[0].parameters())
    value_parameters = sum(p.numel() for p in load_scalar_model(paths["reward_model"])[0].parameters())
    with tempfile.TemporaryDirectory() as temp:
        runs = [measure(workers, paths, Path(temp)) for workers in (1, 2)]
    result = {
        "model": "demo",
        "settings": {**PPO_SETTINGS, "ppo_iterations": ITERATIONS, "reward_model_pairs": PAIRS},
        "allreduce_bytes_per_ppo_step": 4 * (policy_parameters + value_parameters),
        "allreduce_bytes_per_reward_model_step": 4 * value_parameters,
        "runs": runs,
        "ppo_speedup_2_workers": runs[1]["ppo_episodes_per_second"] / runs[0]["ppo_episodes_per_second"],
        **machine(),
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
