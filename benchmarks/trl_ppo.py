"""Hugging Face TRL's PPO (`trl.experimental.ppo.PPOTrainer`, TRL 1.12.0, the last release that ships it) on
the same models, prompts and PPO setting as benchmarks/ppo.py. Prints JSON; never a test.

It runs in its own virtual environment (TRL pins its own dependencies); `benchmarks/run.sh` creates it:

    benchmarks/.venv-trl/bin/python benchmarks/trl_ppo.py --paths PATHS.json --iterations 6 -o out.json

PATHS.json is what `common.prepare(model)` returned, written by benchmarks/run.sh.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from common import PPO_SETTINGS, machine, write_result


def measure(paths: dict[str, str], model: str, iterations: int) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    settings = PPO_SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(paths["prompts"]).read_text().splitlines()]
    dataset = Dataset.from_dict(
        {"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]}
    )
    minibatch = settings["rollout_batch_size"] // settings["num_minibatches"]
    with tempfile.TemporaryDirectory() as temp:
        args = PPOConfig(
            output_dir=temp,
            per_device_train_batch_size=minibatch,
            gradient_accumulation_steps=settings["num_minibatches"],
            num_mini_batches=settings["num_minibatches"],
            num_ppo_epochs=settings["ppo_epochs"],
            total_episodes=settings["rollout_batch_size"] * iterations,
            local_rollout_forward_batch_size=settings["rollout_batch_size"],
            response_length=settings["max_new_tokens"],
            temperature=settings["temperature"],
            learning_rate=settings["learning_rate"],
            kl_coef=settings["kl_coef"],
            stop_token="eos",
            missing_eos_penalty=1.0,
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
        )
        step_ends: list[float] = []

        class Clock(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                step_ends.append(time.perf_counter())

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                step_ends.append(time.perf_counter())

        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
            ref_model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
            reward_model=AutoModelForSequenceClassification.from_pretrained(
                paths["reward_model"], num_labels=1
            ),
            value_model=AutoModelForSequenceClassification.from_pretrained(
                paths["reward_model"], num_labels=1
            ),
            train_dataset=dataset,
            callbacks=[Clock()],
        )
        trainer.train()
    durations = [b - a for a, b in itertools.pairwise(step_ends)]
    steady = durations[1:] or durations
    return {
        "implementation": f"trl {trl.__version__} experimental.ppo.PPOTrainer",
        "model": model,
        "settings": settings,
        "iterations": iterations,
        "episodes_per_second": settings["rollout_batch_size"] / statistics.fmean(steady),
        "seconds_per_iteration": statistics.fmean(steady),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    write_result(args.output, measure(json.loads(args.paths.read_text()), args.model, args.iterations))


if __name__ == "__main__":
    main()
