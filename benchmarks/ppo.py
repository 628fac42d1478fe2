"""Throughput of rlhf-pipelines' PPO: episodes/s and generated tokens/s, split into generation, scoring
(reference log-probs, values, reward) and training, with peak memory. Prints JSON; never a test.

    .venv/bin/python benchmarks/ppo.py --model demo --iterations 6 -o benchmarks/results/ppo-demo.json

Each model runs in a fresh process so peak memory is its own. The first iteration is a warm-up and is left
out of the averages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LLAMA_100M,
    MODELS,
    PPO_SETTINGS,
    machine,
    our_ppo_config,
    peak_memory,
    prepare,
    write_result,
)


def measure(
    model: str,
    iterations: int,
    settings: dict[str, Any] = PPO_SETTINGS,
    lora: dict[str, Any] | None = None,
    recompute: bool = False,
) -> dict[str, Any]:
    """Our PPO on `model` for `iterations` iterations of `settings`; with `lora`, that `lora:` section, and
    with `recompute`, gradient checkpointing."""
    import mlflow

    from rlhf_components import ppo
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    paths = prepare(model)
    config = our_ppo_config(settings, settings["rollout_batch_size"] * iterations)
    lora_section = ppo.Config.model_validate({"lora": lora}).lora
    config = config.model_copy(update={"lora": lora_section, "gradient_checkpointing": recompute})
    with tempfile.TemporaryDirectory() as temp:
        tracking = TrackingConfig(uri=f"sqlite:///{temp}/mlflow.db", experiment="bench")
        uri, parent = start_pipeline_run(tracking, "bench", {}, {})
        context = RunContext(tracking_uri=uri, experiment="bench", parent_run_id=parent, output_root=temp)
        inputs = ppo.Inputs(
            policy=paths["policy"], reward_model=paths["reward_model"], prompts=paths["prompts"]
        )
        ppo.run(config, inputs, context)
        client = mlflow.MlflowClient(uri)
        child = client.search_runs(
            [client.get_experiment_by_name("bench").experiment_id], filter_string="tags.`rlhf.step` = 'ppo'"
        )[0]

        def steady(metric: str) -> float:
            history = sorted(client.get_metric_history(child.info.run_id, metric), key=lambda m: m.step)
            return statistics.fmean(m.value for m in history[1:] or history)

        per_iteration = {name: steady(f"{name}_seconds") for name in ("generation", "scoring", "training")}
        return {
            "implementation": "rlhf-pipelines",
            "model": model,
            "architecture": MODELS.get(model, LLAMA_100M),
            "settings": settings,
            "lora": lora,
            "gradient_checkpointing": recompute,
            "iterations": iterations,
            "episodes_per_second": steady("episodes_per_second"),
            "generated_tokens_per_second": steady("tokens_per_second"),
            "mean_response_tokens": steady("response_length"),
            "seconds_per_iteration": per_iteration,
            "generation_share": per_iteration["generation"] / sum(per_iteration.values()),
            **peak_memory(),
            **machine(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    write_result(args.output, measure(args.model, args.iterations))


if __name__ == "__main__":
    main()
