"""Hugging Face TRL 1.16's RLOOTrainer (critic-free: k samples per prompt, leave-one-out baseline) on the same
models, prompts and rollout shape as benchmarks/ppo.py: 64 episodes per rollout (16 prompts × 4 samples),
4 epochs × 4 minibatches, 32 new tokens, temperature 0.7. Prints JSON; never a test. Its own venv:

    benchmarks/.venv-trl-rloo/bin/python benchmarks/trl_rloo.py --paths PATHS.json --iterations 6 -o out.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


from common import RolloutClock, policy_tokenizer_and_prompts, reference_main, reference_result

SAMPLES_PER_PROMPT = 4


def measure(
    paths: dict[str, str], model: str, iterations: int, settings: dict[str, Any], save_policy: Path | None
) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RLOOConfig, RLOOTrainer

    tokenizer, prompts = policy_tokenizer_and_prompts(paths)
    minibatch = settings["rollout_batch_size"] // settings["num_minibatches"]
    steps_per_rollout = settings["num_minibatches"] * settings["ppo_epochs"]
    with tempfile.TemporaryDirectory() as temp:
        args = RLOOConfig(
            output_dir=temp,
            per_device_train_batch_size=minibatch,
            steps_per_generation=settings["num_minibatches"],
            num_iterations=settings["ppo_epochs"],
            num_generations=SAMPLES_PER_PROMPT,
            max_completion_length=settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_k=0,
            top_p=1.0,
            learning_rate=settings["learning_rate"],
            beta=settings["kl_coef"],
            max_steps=steps_per_rollout * iterations,
            report_to=[],
            save_strategy="no",
            logging_steps=steps_per_rollout,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
        )
        clock = RolloutClock()
        trainer = RLOOTrainer(
            model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
            reward_funcs=AutoModelForSequenceClassification.from_pretrained(
                paths["reward_model"], num_labels=1
            ),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
            callbacks=[clock.callback],
        )
        trainer.train()
        if save_policy is not None:
            trainer.save_model(str(save_policy))
    return reference_result(
        f"trl {trl.__version__} RLOOTrainer",
        model,
        {**settings, "samples_per_prompt": SAMPLES_PER_PROMPT},
        iterations,
        clock.seconds_per_rollout(steps_per_rollout),
    )


if __name__ == "__main__":
    reference_main(measure, __doc__.splitlines()[0])
