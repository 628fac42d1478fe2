"""Throughput of rlhf-pipelines' DPO: pairs/s over the whole training (its reference pass over the training
pairs included; the held-out set is 16 pairs) and per optimizer step, with peak memory, on the demo model
and a random-init 6 × 512 GPT-2. Prints JSON; never a test. TRL 1.16's DPOTrainer runs the same setting in
benchmarks/trl_dpo.py.

    .venv/bin/python benchmarks/dpo.py --model demo -o benchmarks/results/dpo-demo.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DPO_SETTINGS, MODELS, machine, prepare, prepare_pairs, write_result


def measure(model: str) -> dict[str, Any]:
    import mlflow

    from rlhf_components import dpo
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    settings = DPO_SETTINGS
    pairs = prepare_pairs(settings["pairs"])
    config = dpo.Config(
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        beta=settings["beta"],
        max_length=settings["max_length"],
    )
    with tempfile.TemporaryDirectory() as temp:
        tracking = TrackingConfig(uri=f"sqlite:///{temp}/mlflow.db", experiment="bench")
        uri, parent = start_pipeline_run(tracking, "bench", {}, {})
        context = RunContext(tracking_uri=uri, experiment="bench", parent_run_id=parent, output_root=temp)
        inputs = dpo.Inputs(policy=prepare(model)["policy"], train=pairs, eval=prepare_pairs(16))
        dpo.run(config, inputs, context)
        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs(
            [client.get_experiment_by_name("bench").experiment_id], filter_string="tags.`rlhf.step` = 'dpo'"
        )
        per_step = [m.value for m in client.get_metric_history(run.info.run_id, "pairs_per_second")]
        reference_seconds = run.data.metrics["reference_seconds"]
    step_seconds = sum(settings["batch_size"] / rate for rate in per_step)
    return {
        "implementation": "rlhf-pipelines",
        "model": model,
        "architecture": MODELS[model],
        "settings": settings,
        "pairs_per_second": settings["pairs"] / (reference_seconds + step_seconds),
        "steady_pairs_per_second": statistics.fmean(per_step[1:]),
        "reference_seconds": reference_seconds,
        "train_seconds": reference_seconds + step_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    write_result(args.output, measure(args.model))


if __name__ == "__main__":
    main()
