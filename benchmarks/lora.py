"""Memory and speed of PPO with full fine-tuning vs LoRA: peak memory and episodes/s measured on the 6×512
GPT-2 and a ~100M-parameter Llama, each run in a fresh process; and, computed from parameter counts, the
memory of both for 1B, 7B and 13B Llama-shaped models in bf16 and what fits on one 80 GB GPU. JSON; never a
test.

    .venv/bin/python benchmarks/lora.py -o benchmarks/results/lora.json        (all of it)
    .venv/bin/python benchmarks/lora.py --model llama-100m --mode lora         (one measurement)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PPO_SETTINGS, write_result

MEASURED = ("gpt2-6x512", "llama-100m")
# A smaller rollout than PPO_SETTINGS': full PPO of a 100M model on two CPU cores takes minutes an iteration.
SETTINGS = {
    **PPO_SETTINGS,
    "rollout_batch_size": 16,
    "num_minibatches": 2,
    "ppo_epochs": 2,
    "max_new_tokens": 24,
}
LORA = {"rank": 16, "alpha": 32.0}
ITERATIONS = 3
GPU_GB = 80

# Llama-shaped models: hidden size, layers, MLP width, key/value width (grouped-query attention), vocabulary,
# tied embeddings. Llama 3.2 1B, Llama 2 7B and 13B.
ARCHITECTURES = {
    "1B": {"hidden": 2048, "layers": 16, "mlp": 8192, "kv": 512, "vocab": 128256, "tied": True},
    "7B": {"hidden": 4096, "layers": 32, "mlp": 11008, "kv": 4096, "vocab": 32000, "tied": False},
    "13B": {"hidden": 5120, "layers": 40, "mlp": 13824, "kv": 5120, "vocab": 32000, "tied": False},
}


def parameter_counts(shape: dict[str, Any], rank: int) -> tuple[int, int, int]:
    """(the causal LM's parameters, the same backbone's with a scalar head instead of the LM head, a
    rank-`rank` LoRA's on every linear layer of the blocks): an adapted (in → out) layer adds
    rank × (in + out)."""
    d, mlp, kv = shape["hidden"], shape["mlp"], shape["kv"]
    linear = [(d, d), (d, kv), (d, kv), (d, d), (d, mlp), (d, mlp), (mlp, d)]  # q k v o gate up down
    per_layer = sum(i * o for i, o in linear) + 2 * d  # and two RMSNorms
    backbone = shape["layers"] * per_layer + shape["vocab"] * d + d
    causal = backbone + (0 if shape["tied"] else shape["vocab"] * d)
    adapter = shape["layers"] * sum(rank * (i + o) for i, o in linear)
    return causal, backbone + d, adapter


def ppo_memory_gb(shape: dict[str, Any], rank: int) -> dict[str, Any]:
    """The weights and optimizer state PPO holds, as this package's trainers hold them, in GB (10⁹ bytes).

    Full: policy and value model train with float32 master weights, float32 gradients and two Adam moments
    (16 bytes a parameter); the reference and the reward model are frozen in bf16 (2 bytes).
    LoRA: one bf16 base serves policy and reference, one serves reward and value model; the policy's and the
    value model's adapters and the value head train at 16 bytes a parameter.
    Activations and the KV cache come on top of both; they depend on batch and length."""
    causal, scalar, adapter = parameter_counts(shape, rank)
    full = (16 + 2) * (causal + scalar)
    lora = 2 * (causal + scalar) + 16 * (2 * adapter + shape["hidden"])
    return {
        "parameters_billions": round(causal / 1e9, 2),
        "lora_parameters_millions": round(adapter / 1e6, 1),
        "full_ppo_gb": round(full / 1e9, 1),
        "lora_ppo_gb": round(lora / 1e9, 1),
        "full_fits_80gb": full / 1e9 < GPU_GB,
        "lora_fits_80gb": lora / 1e9 < GPU_GB,
        "left_for_activations_with_lora_gb": round(GPU_GB - lora / 1e9, 1),
    }


MODES = ("full", "lora", "full+recompute", "lora+recompute")
"""each model's runs: full fine-tuning or LoRA, without and with gradient checkpointing"""


def measure_in_fresh_process(model: str, mode: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--model", model, "--mode", mode, "-o", out.name]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def measure_all() -> dict[str, Any]:
    measured = []
    for model in MEASURED:
        runs = {mode: measure_in_fresh_process(model, mode) for mode in MODES}
        full, lora = runs["full"], runs["lora"]
        measured.append(
            {
                "model": model,
                "device": full["device"],
                **{
                    mode: {
                        "peak_rss_mb": round(run["peak_rss_mb"]),
                        "episodes_per_second": round(run["episodes_per_second"], 2),
                        "seconds_per_iteration": run["seconds_per_iteration"],
                    }
                    for mode, run in runs.items()
                },
                "lora_peak_over_full": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
                "lora_speed_over_full": round(lora["episodes_per_second"] / full["episodes_per_second"], 3),
            }
        )
    computed = {name: ppo_memory_gb(shape, int(LORA["rank"])) for name, shape in ARCHITECTURES.items()}
    return {
        "settings": SETTINGS,
        "iterations": ITERATIONS,
        "lora": LORA,
        "measured": measured,
        "computed": computed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MEASURED)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    if args.mode is None:
        write_result(args.output, measure_all())
        return
    from ppo import measure

    lora = LORA if args.mode.startswith("lora") else None
    recompute = args.mode.endswith("recompute")
    write_result(args.output, measure(args.model, ITERATIONS, SETTINGS, lora, recompute))


if __name__ == "__main__":
    main()
