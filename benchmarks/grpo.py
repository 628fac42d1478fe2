"""Throughput and learning of rlhf-pipelines' GRPO (or RLOO) on the arithmetic demo: episodes/s, peak memory
and the reward curve (exact-match accuracy of the sampled completions, per step). Prints JSON; never a test.

    .venv/bin/python benchmarks/grpo.py --advantage grpo --steps 150 -o benchmarks/results/runs/grpo-1.json

The same settings as benchmarks/trl_grpo.py (common.GRPO_SETTINGS). The first step is a warm-up and is left
out of the throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GRPO_SETTINGS, machine, peak_memory, prepare_arithmetic, write_result


def measure(advantage: str, steps: int, seed: int) -> dict[str, Any]:
    import mlflow

    from rlhf_components import grpo
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    paths = prepare_arithmetic()
    settings = GRPO_SETTINGS
    config = grpo.Config.model_validate(
        {
            "rewards": [{"function": "exact_match"}],
            "advantage": advantage,
            "total_episodes": steps * settings["prompts_per_step"] * settings["num_generations"],
            "sampling": {
                "temperature": settings["temperature"],
                "max_new_tokens": settings["max_new_tokens"],
            },
            **{key: settings[key] for key in settings if key not in ("temperature", "max_new_tokens")},
        }
    )
    with tempfile.TemporaryDirectory() as temp:
        tracking = TrackingConfig(uri=f"sqlite:///{temp}/mlflow.db", experiment="bench")
        uri, parent = start_pipeline_run(tracking, "bench", {}, {})
        context = RunContext(
            tracking_uri=uri, experiment="bench", parent_run_id=parent, output_root=temp, seed=seed
        )
        grpo.run(config, grpo.Inputs(policy=paths["policy"], prompts=paths["prompts"]), context)
        client = mlflow.MlflowClient(uri)
        child = client.search_runs(
            [client.get_experiment_by_name("bench").experiment_id], filter_string="tags.`rlhf.step` = 'grpo'"
        )[0]

        def history(metric: str) -> list[float]:
            points = sorted(client.get_metric_history(child.info.run_id, metric), key=lambda m: m.step)
            return [point.value for point in points]

        speeds = history("episodes_per_second")
        return {
            "implementation": f"rlhf-pipelines grpo ({advantage})",
            "advantage": advantage,
            "settings": settings,
            "steps": steps,
            "seed": seed,
            "episodes_per_second": statistics.fmean(speeds[1:] or speeds),
            "reward_curve": [round(value, 4) for value in history("reward")],
            **peak_memory(),
            **machine(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--advantage", choices=("grpo", "rloo"), default="grpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    write_result(args.output, measure(args.advantage, args.steps, args.seed))


if __name__ == "__main__":
    main()
