"""Hugging Face TRL 1.16's `DPOTrainer` on the same model, pairs and DPO setting as benchmarks/dpo.py, with
the reference log-probs precomputed as ours are. Prints JSON; never a test.

It runs in TRL 1.16's virtual environment, which `benchmarks/run.sh` creates:

    benchmarks/.venv-trl-rloo/bin/python benchmarks/trl_dpo.py --paths PATHS.json --model demo -o out.json
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DPO_SETTINGS, RolloutClock, machine, reference_main


def measure(
    paths: dict[str, str], model: str, iterations: int, settings: dict[str, Any], save_policy: Path | None
) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    settings = {**DPO_SETTINGS, **{k: v for k, v in settings.items() if k in DPO_SETTINGS}}
    pairs = [json.loads(line) for line in Path(paths["pairs"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    with tempfile.TemporaryDirectory() as temp:
        args = DPOConfig(
            output_dir=temp,
            per_device_train_batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            beta=settings["beta"],
            max_length=settings["max_length"],
            num_train_epochs=1,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=settings["batch_size"],
            adam_epsilon=1e-8,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
            use_cpu=not torch.cuda.is_available(),
        )
        clock = RolloutClock()
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
            ref_model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {
        "implementation": f"trl {trl.__version__} DPOTrainer (precompute_ref_log_probs)",
        "model": model,
        "settings": settings,
        "pairs": len(pairs),
        "pairs_per_second": len(pairs) / seconds,
        "steady_pairs_per_second": settings["batch_size"] / clock.seconds_per_rollout(1),
        "train_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **machine(),
    }


if __name__ == "__main__":
    reference_main(measure, __doc__.splitlines()[0])
