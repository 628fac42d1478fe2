"""Equal learning: our PPO and TRL 1.12's PPO trained on the demo task with one reward model, setting and
episodes, then both judged the same way. The judge is `evaluate` on held-out prompts, against the SFT policy,
by the reward model and the hidden gold judge. Prints JSON; never a test.

    .venv/bin/python benchmarks/learning.py -o benchmarks/results/learning.json

The reward model comes from the demo pipeline's own steps (prompts, candidates, simulated feedback,
Bradley–Terry), run here under benchmarks/.cache/learning; they are deterministic, so every run trains the
same one. TRL reads raw reward-model scores, so its copy of
the reward model has our normalisation's scale folded into the head; the mean shift is left out, and
advantage whitening makes it irrelevant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, PPO_SETTINGS, machine, our_ppo_config, write_result

ROOT = CACHE / "learning"
TRL_PYTHON = Path(__file__).resolve().parent / ".venv-trl" / "bin" / "python"
# The demo's PPO setting (examples/demo.yaml), used by both implementations.
SETTINGS = {**PPO_SETTINGS, "learning_rate": 3e-4, "kl_coef": 0.1}
EPISODES = 2048


def build_reward_model(context: Any) -> tuple[dict[str, Any], str, str]:
    """(prompt splits, reward model for us, reward model with the scale folded in for TRL)."""
    import torch

    from rlhf_components import collect_prompts, generate_candidates, ingest_feedback, train_reward_model
    from rlhf_components.core.config import SamplingConfig
    from rlhf_components.core.models import load_scalar_model, reward_normalization, save_checkpoint
    from rlhf_components.demo import DemoAssetsSpec, build_demo_assets

    assets = build_demo_assets(CACHE / "demo-assets-learning", DemoAssetsSpec(n_prompts=2000))
    prompts = collect_prompts.run(
        collect_prompts.Config(sources=[assets.prompts_file], eval_fraction=0.2),
        collect_prompts.Inputs(),
        context,
    )
    inbox = str(ROOT / "inbox")
    candidates = generate_candidates.run(
        generate_candidates.Config(samples_per_prompt=4, sampling=SamplingConfig(temperature=1.0)),
        generate_candidates.Inputs(policy=assets.sft_model_dir, prompts=prompts.train, inbox=inbox),
        context,
    )
    feedback = ingest_feedback.run(
        ingest_feedback.Config(simulated_annotator="demo-gold-sentiment"),
        ingest_feedback.Inputs(inbox=inbox, tasks=candidates.tasks),
        context,
    )
    reward = train_reward_model.run(
        train_reward_model.Config(epochs=2, learning_rate=5e-4, batch_size=32),
        train_reward_model.Inputs(base_model=assets.sft_model_dir, train=feedback.train, eval=feedback.eval),
        context,
    )
    model, tokenizer = load_scalar_model(reward.reward_model)
    _, std = reward_normalization(model)
    with torch.no_grad():
        model.score.weight /= std
    trl_reward = str(ROOT / "reward_model_for_trl")
    save_checkpoint(model, tokenizer, trl_reward)
    split = {"train": prompts.train, "eval": prompts.eval, "sft": assets.sft_model_dir}
    return split, reward.reward_model, trl_reward


def _pick(metrics: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    return {key: metrics[key] for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()

    from rlhf_components import evaluate, ppo
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    ROOT.mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(uri=f"sqlite:///{ROOT / 'mlflow.db'}", experiment="learning")
    uri, parent = start_pipeline_run(tracking, "learning", {}, {})
    context = RunContext(tracking_uri=uri, experiment="learning", parent_run_id=parent, output_root=str(ROOT))
    split, reward_model, trl_reward_model = build_reward_model(context)
    iterations = EPISODES // SETTINGS["rollout_batch_size"]

    started = time.perf_counter()
    ours = ppo.run(
        our_ppo_config(SETTINGS, EPISODES),
        ppo.Inputs(policy=split["sft"], reward_model=reward_model, prompts=split["train"]),
        context,
    )
    ours_seconds = time.perf_counter() - started

    trl_policy = ROOT / f"trl-policy-{parent}"
    paths = ROOT / "trl-paths.json"
    paths.write_text(
        json.dumps({"policy": split["sft"], "reward_model": trl_reward_model, "prompts": split["train"]})
    )
    started = time.perf_counter()
    subprocess.run(
        [
            str(TRL_PYTHON),
            str(Path(__file__).with_name("trl_ppo.py")),
            "--paths",
            str(paths),
            "--iterations",
            str(iterations),
            "--settings",
            json.dumps(SETTINGS),
            "--save-policy",
            str(trl_policy),
        ],
        check=True,
        capture_output=True,
    )
    trl_seconds = time.perf_counter() - started

    def judged(policy: str) -> dict[str, float]:
        config = evaluate.Config(gold_judge="demo-gold-sentiment")
        inputs = evaluate.Inputs(
            candidate=policy, reference=split["sft"], reward_model=reward_model, prompts=split["eval"]
        )
        return evaluate.run(config, inputs, context).metrics

    keys = (
        "gold_win_rate",
        "gold_win_rate_ci_low",
        "gold_win_rate_ci_high",
        "rm_win_rate",
        "kl",
        "gold_score",
    )
    result = {
        "episodes": EPISODES,
        "settings": SETTINGS,
        "rlhf_pipelines": {**_pick(judged(ours.policy), keys), "train_seconds": ours_seconds},
        "trl_1_12_ppo": {
            **_pick(judged(str(trl_policy)), keys),
            "train_seconds_with_startup": trl_seconds,
        },
        **machine(),
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
