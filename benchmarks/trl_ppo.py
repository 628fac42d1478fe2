"""Hugging Face TRL's PPO (`trl.experimental.ppo.PPOTrainer`, TRL 1.12.0, the last release that ships it) on
the same models, prompts and PPO setting as benchmarks/ppo.py. Prints JSON; never a test.

It runs in its own virtual environment (TRL pins its own dependencies); `benchmarks/run.sh` creates it:

    benchmarks/.venv-trl/bin/python benchmarks/trl_ppo.py --paths PATHS.json --iterations 6 -o out.json

PATHS.json is what `common.prepare(model)` returned, written by benchmarks/run.sh.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


from common import RolloutClock, policy_tokenizer_and_prompts, reference_main, reference_result


def measure(
    paths: dict[str, str], model: str, iterations: int, settings: dict[str, Any], save_policy: Path | None
) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer, prompts = policy_tokenizer_and_prompts(paths)
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
            adam_epsilon=1e-5,  # as ours (N+ implementation details)
            seed=settings.get("seed", 0),
            use_cpu=not torch.cuda.is_available(),
        )
        clock = RolloutClock()
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
            callbacks=[clock.callback],
        )
        trainer.train()
        if save_policy is not None:
            trainer.save_model(str(save_policy))
    result = reference_result(
        f"trl {trl.__version__} experimental.ppo.PPOTrainer",
        model,
        settings,
        iterations,
        clock.seconds_per_rollout(1),
    )
    logged = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    result["curves"] = {
        "score": [entry["objective/scores"] for entry in logged],
        "kl": [entry["objective/kl"] for entry in logged],
    }
    return result


if __name__ == "__main__":
    reference_main(measure, __doc__.splitlines()[0])
