"""Models and settings shared by the PPO benchmarks (ours and the reference implementations).

Everything is built locally and cached under benchmarks/.cache: the demo SFT policy, and a larger random-init
GPT-2 (6 layers × 512) with the demo tokenizer. The reward model of each is its policy's backbone with a
scalar head: throughput does not depend on what the head learned.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE = Path(__file__).resolve().parent / ".cache"

# One PPO setting for every implementation: rollout size, epochs, minibatches, response length, sampling.
PPO_SETTINGS: dict[str, Any] = {
    "rollout_batch_size": 64,
    "num_minibatches": 4,
    "ppo_epochs": 4,
    "max_new_tokens": 32,
    "temperature": 0.7,
    "learning_rate": 3e-6,
    "kl_coef": 0.05,
}

# One DPO setting for both implementations.
DPO_SETTINGS: dict[str, Any] = {
    "pairs": 512,
    "batch_size": 16,
    "learning_rate": 5e-7,
    "beta": 0.1,
    "max_length": 64,
}

# One GRPO setting for every implementation, on the arithmetic demo (examples/grpo.yaml): 16 prompts × 8
# completions per step, one optimizer step per step (μ = 1), no KL term, DAPO's token loss and clip-higher.
GRPO_SETTINGS: dict[str, Any] = {
    "prompts_per_step": 16,
    "num_generations": 8,
    "max_new_tokens": 8,
    "temperature": 1.0,
    "learning_rate": 5e-4,
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "num_iterations": 1,
}
# The arithmetic demo's assets, as examples/grpo.yaml builds them.
ARITHMETIC_SPEC = {"task": "arithmetic", "n_corpus": 8000, "sft_steps": 1500}

MODELS = {
    "demo": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    "gpt2-6x512": {"n_layer": 6, "n_embd": 512, "n_head": 8},
}
# A random-init Llama of about 100M parameters with the demo tokenizer (benchmarks/lora.py).
LLAMA_100M = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "intermediate_size": 2560,
}


def prepare(model: str) -> dict[str, str]:
    """Policy, reward model and prompts for `model`, built once: {"policy", "reward_model", "prompts"}."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from rlhf_components.demo import DemoAssetsSpec, build_demo_assets

    assets = build_demo_assets(CACHE / "demo-assets", DemoAssetsSpec())
    root = CACHE / model
    policy_dir = Path(assets.sft_model_dir) if model == "demo" else root / "policy"
    reward_dir = root / "reward_model"
    if model != "demo" and not (policy_dir / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(assets.sft_model_dir)
        torch.manual_seed(0)
        special = {
            "bos_token_id": tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        policy: Any
        if model == "llama-100m":
            llama = LlamaConfig(
                vocab_size=len(tokenizer), max_position_embeddings=128, **LLAMA_100M, **special
            )
            policy = LlamaForCausalLM(llama)
        else:
            policy = GPT2LMHeadModel(
                GPT2Config(vocab_size=len(tokenizer), n_positions=128, **MODELS[model], **special)
            )
        policy.save_pretrained(policy_dir, safe_serialization=True)
        tokenizer.save_pretrained(policy_dir)
    if not (reward_dir / "config.json").is_file():
        reward = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        reward.save_pretrained(reward_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(policy_dir).save_pretrained(reward_dir)
    return {"policy": str(policy_dir), "reward_model": str(reward_dir), "prompts": assets.prompts_file}


def prepare_arithmetic() -> dict[str, str]:
    """The arithmetic demo's SFT policy and its training prompts (the rows collect_prompts would put in the
    train split), with their `answer` column: {"policy", "prompts"}."""
    from rlhf_components.core.records import prompt_id
    from rlhf_components.core.splits import is_eval
    from rlhf_components.demo import DemoAssetsSpec, build_demo_assets

    assets = build_demo_assets(CACHE / "arithmetic-assets", DemoAssetsSpec(**ARITHMETIC_SPEC))
    train = CACHE / "arithmetic-train.jsonl"
    rows = [json.loads(line) for line in Path(assets.prompts_file).read_text().splitlines()]
    kept = [row for row in rows if not is_eval(prompt_id(row["prompt"]), 0.2)]
    train.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    return {"policy": assets.sft_model_dir, "prompts": str(train)}


def prepare_pairs(count: int) -> str:
    """A JSONL file of `count` preference pairs from the demo grammar: a positive review over a negative."""
    import random

    from rlhf_components.demo.grammar import sample_kind, sample_prompt, sample_review

    path = CACHE / f"pairs-{count}.jsonl"
    if not path.is_file():
        rng = random.Random(0)
        rows = []
        for _ in range(count):
            kind = sample_kind(rng)
            rows.append(
                {
                    "prompt": sample_prompt(rng, kind),
                    "chosen": sample_review(rng, 1.0, kind),
                    "rejected": sample_review(rng, -1.0, kind),
                }
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def our_ppo_config(settings: dict[str, Any], episodes: int) -> Any:
    """rlhf-pipelines' PPO config for a benchmark setting."""
    from rlhf_components import ppo
    from rlhf_components.core.config import SamplingConfig

    return ppo.Config(
        total_episodes=episodes,
        rollout_batch_size=settings["rollout_batch_size"],
        num_minibatches=settings["num_minibatches"],
        ppo_epochs=settings["ppo_epochs"],
        learning_rate=settings["learning_rate"],
        kl_coef=settings["kl_coef"],
        sampling=SamplingConfig(
            max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"]
        ),
    )


def policy_tokenizer_and_prompts(paths: dict[str, str]) -> tuple[Any, list[str]]:
    """For the reference runners: the policy's tokenizer, left-padding, and the prompt texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(paths["prompts"]).read_text().splitlines()]
    return tokenizer, prompts


def reference_result(
    implementation: str, model: str, settings: dict[str, Any], iterations: int, seconds_per_rollout: float
) -> dict[str, Any]:
    """The JSON a reference runner prints: throughput of one rollout + update, peak memory, the machine."""
    return {
        "implementation": implementation,
        "model": model,
        "settings": settings,
        "iterations": iterations,
        "episodes_per_second": settings["rollout_batch_size"] / seconds_per_rollout,
        "seconds_per_iteration": seconds_per_rollout,
        **peak_memory(),
        **machine(),
    }


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory, and the peak GPU memory torch allocated when there is a GPU."""
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def machine() -> dict[str, Any]:
    import torch

    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu × {torch.get_num_threads()}"
    )
    return {"device": device, "torch": torch.__version__, "python": platform.python_version()}


class RolloutClock:
    """Timestamps at the start of training and after every optimizer step of a transformers Trainer."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        self.stamps: list[float] = []
        stamps = self.stamps

        class Callback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                stamps.append(time.perf_counter())

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                stamps.append(time.perf_counter())

        self.callback = Callback()

    def seconds_per_rollout(self, steps_per_rollout: int) -> float:
        """Mean wall time of a rollout and its update, the first (warm-up) one left out."""
        starts = self.stamps[::steps_per_rollout]
        durations = [b - a for a, b in itertools.pairwise(starts)]
        return statistics.fmean(durations[1:] or durations)


Measure = Callable[[dict[str, str], str, int, dict[str, Any], Path | None], dict[str, Any]]


def reference_main(measure: Measure, description: str) -> None:
    """Command line of the reference runners: --paths (from common.prepare) --model --iterations -o, plus
    --settings JSON overriding PPO_SETTINGS and --save-policy DIR for the learning comparison."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--paths", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--settings", type=json.loads, default={})
    parser.add_argument("--save-policy", type=Path, default=None)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    settings = {**PPO_SETTINGS, **args.settings}
    paths = json.loads(args.paths.read_text())
    write_result(args.output, measure(paths, args.model, args.iterations, settings, args.save_policy))


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
