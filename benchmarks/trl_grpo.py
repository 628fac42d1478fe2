"""Hugging Face TRL 1.16's GRPOTrainer or RLOOTrainer on the arithmetic demo, with the settings of
benchmarks/grpo.py (common.GRPO_SETTINGS): the same SFT policy, training prompts, exact-match reward,
prompts per step, K, completion length, μ, β, ε and learning-rate schedule. Prints JSON with episodes/s, peak
memory and the reward curve; never a test. Its own venv (benchmarks/run.sh makes it):

    benchmarks/.venv-trl-rloo/bin/python benchmarks/trl_grpo.py --paths PATHS.json --trainer grpo -o out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GRPO_SETTINGS, RolloutClock, machine, peak_memory, write_result


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """The reward of benchmarks/grpo.py: 1 where the stripped completion is the row's answer."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def measure(paths: dict[str, str], trainer_name: str, steps: int, seed: int) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    settings = GRPO_SETTINGS
    rows = [json.loads(line) for line in Path(paths["prompts"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    config_class, trainer_class = (
        (GRPOConfig, GRPOTrainer) if trainer_name == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    shared = {
        "per_device_train_batch_size": settings["prompts_per_step"] * settings["num_generations"],
        "steps_per_generation": 1,
        "num_generations": settings["num_generations"],
        "max_completion_length": settings["max_new_tokens"],
        "temperature": settings["temperature"],
        "top_k": 0,
        "top_p": 1.0,
        "learning_rate": settings["learning_rate"],
        "beta": settings["beta"],
        "epsilon": settings["epsilon"],
        "epsilon_high": settings["epsilon_high"],
        "num_iterations": settings["num_iterations"],
        "disable_dropout": True,
        "max_steps": steps,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "seed": seed,
        "use_cpu": not torch.cuda.is_available(),
    }
    specific = {"loss_type": "dapo", "scale_rewards": "group"} if trainer_name == "grpo" else {}
    with tempfile.TemporaryDirectory() as temp:
        clock = RolloutClock()
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
            reward_funcs=exact_match,
            args=config_class(output_dir=temp, **shared, **specific),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
        trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    episodes = settings["prompts_per_step"] * settings["num_generations"]
    return {
        "implementation": f"trl {trl.__version__} {trainer_class.__name__}",
        "settings": {**settings, **specific},
        "steps": steps,
        "seed": seed,
        "episodes_per_second": episodes / clock.seconds_per_rollout(1),
        "reward_curve": [round(value, 4) for value in rewards],
        **peak_memory(),
        **machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=Path, required=True, help="JSON from common.prepare_arithmetic()")
    parser.add_argument("--trainer", choices=("grpo", "rloo"), default="grpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    paths = json.loads(args.paths.read_text())
    write_result(args.output, measure(paths, args.trainer, args.steps, args.seed))


if __name__ == "__main__":
    main()
