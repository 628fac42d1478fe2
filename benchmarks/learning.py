"""Equal learning: our PPO and TRL 1.12's PPO trained on the demo task with one reward model, setting and
episodes, over several seeds, then both judged the same way. The judge is `evaluate` on held-out prompts,
against the SFT policy, by the reward model and the hidden gold judge. Also records both reward curves
(score per iteration, on one scale) and plots them next to the JSON. Prints JSON; never a test.

    .venv/bin/python benchmarks/learning.py --seeds 0 1 2 -o benchmarks/results/learning.json

The reward model comes from the demo pipeline's own steps (prompts, candidates, simulated feedback,
Bradley–Terry), run here under benchmarks/.cache/learning; they are deterministic, so every run trains the
same one. TRL reads raw reward-model scores, so its copy of
the reward model has our normalisation's scale folded into the head; the mean shift is left out, and
advantage whitening makes it irrelevant.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    model, fmt = load_scalar_model(reward.reward_model)
    _, std = reward_normalization(model)
    with torch.no_grad():
        model.score.weight /= std
    trl_reward = str(ROOT / "reward_model_for_trl")
    save_checkpoint(model, fmt, trl_reward)
    split = {"train": prompts.train, "eval": prompts.eval, "sft": assets.sft_model_dir}
    return split, reward.reward_model, trl_reward


KEYS = ("gold_win_rate", "gold_win_rate_ci_low", "gold_win_rate_ci_high", "rm_win_rate", "kl", "gold_score")


def train_ours(
    context: Any, split: dict[str, Any], reward_model: str, seed: int
) -> tuple[str, dict[str, Any]]:
    """(policy, {train_seconds, curves}) of our PPO with `seed`."""
    import mlflow

    from rlhf_components import ppo

    seeded = context.model_copy(update={"seed": seed, "output_root": str(ROOT / f"ours-seed{seed}")})
    started = time.perf_counter()
    outputs = ppo.run(
        our_ppo_config(SETTINGS, EPISODES),
        ppo.Inputs(policy=split["sft"], reward_model=reward_model, prompts=split["train"]),
        seeded,
    )
    seconds = time.perf_counter() - started
    client = mlflow.MlflowClient(context.tracking_uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name(context.experiment).experiment_id],
        filter_string="tags.`rlhf.step` = 'ppo'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )

    def curve(metric: str) -> list[float]:
        history = client.get_metric_history(run.info.run_id, metric)
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    return outputs.policy, {"train_seconds": seconds, "curves": {"score": curve("score"), "kl": curve("kl")}}


def train_trl(
    split: dict[str, Any], trl_reward_model: str, seed: int, offset: float
) -> tuple[str, dict[str, Any]]:
    """(policy, {train_seconds_with_startup, curves}) of TRL's PPO with `seed`; its scores are shifted by
    `offset` onto our scale (it reads the reward model without our mean shift)."""
    policy = ROOT / f"trl-policy-seed{seed}"
    paths = ROOT / "trl-paths.json"
    paths.write_text(
        json.dumps({"policy": split["sft"], "reward_model": trl_reward_model, "prompts": split["train"]})
    )
    output = ROOT / f"trl-seed{seed}.json"
    started = time.perf_counter()
    subprocess.run(
        [
            str(TRL_PYTHON),
            str(Path(__file__).with_name("trl_ppo.py")),
            "--paths",
            str(paths),
            "--iterations",
            str(EPISODES // SETTINGS["rollout_batch_size"]),
            "--settings",
            json.dumps({**SETTINGS, "seed": seed}),
            "--save-policy",
            str(policy),
            "-o",
            str(output),
        ],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    curves = json.loads(output.read_text())["curves"]
    curves["score"] = [score + offset for score in curves["score"]]
    return str(policy), {"train_seconds_with_startup": seconds, "curves": curves}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and standard deviation over seeds of each judged metric and of the last quarter of the curve."""
    summary: dict[str, float] = {}
    for key in (*KEYS, "final_score"):
        values = [run[key] for run in runs]
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def plot(path: Path, ours: list[dict[str, Any]], trl: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for runs, label, color in ((ours, "rlhf-pipelines", "tab:blue"), (trl, "TRL 1.12 PPO", "tab:orange")):
        for index, run in enumerate(runs):
            for axis, metric in zip(axes, ("score", "kl"), strict=True):
                axis.plot(run["curves"][metric], color=color, alpha=0.7, label=label if index == 0 else None)
    for axis, metric in zip(
        axes, ("reward-model score (our scale)", "KL to the reference (nats)"), strict=True
    ):
        axis.set_xlabel("PPO iteration")
        axis.set_ylabel(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()

    from rlhf_components import evaluate
    from rlhf_components.core.models import load_scalar_model, reward_normalization
    from rlhf_components.core.runtime import setup_logging
    from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run

    setup_logging("WARNING")
    ROOT.mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(uri=f"sqlite:///{ROOT / 'mlflow.db'}", experiment="learning")
    uri, parent = start_pipeline_run(tracking, "learning", {}, {})
    context = RunContext(tracking_uri=uri, experiment="learning", parent_run_id=parent, output_root=str(ROOT))
    split, reward_model, trl_reward_model = build_reward_model(context)
    mean, std = reward_normalization(load_scalar_model(reward_model)[0])

    def judged(policy: str) -> dict[str, float]:
        config = evaluate.Config(gold_judge="demo-gold-sentiment")
        inputs = evaluate.Inputs(
            candidate=policy, reference=split["sft"], reward_model=reward_model, prompts=split["eval"]
        )
        return {key: evaluate.run(config, inputs, context).metrics[key] for key in KEYS}

    def with_final_score(run: dict[str, Any]) -> dict[str, Any]:
        scores = run["curves"]["score"]
        return {**run, "final_score": statistics.fmean(scores[-max(1, len(scores) // 4) :])}

    ours, trl = [], []
    for seed in args.seeds:
        policy, run = train_ours(context, split, reward_model, seed)
        ours.append(with_final_score({"seed": seed, **judged(policy), **run}))
        policy, run = train_trl(split, trl_reward_model, seed, offset=-mean / std)
        trl.append(with_final_score({"seed": seed, **judged(policy), **run}))
    result = {
        "episodes": EPISODES,
        "settings": SETTINGS,
        "seeds": args.seeds,
        "rlhf_pipelines": {
            **summarize(ours),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in ours),
            "runs": ours,
        },
        "trl_1_12_ppo": {
            **summarize(trl),
            "train_seconds_with_startup_mean": statistics.fmean(r["train_seconds_with_startup"] for r in trl),
            "runs": trl,
        },
        **machine(),
    }
    if args.output is not None:
        plot(args.output.with_suffix(".png"), ours, trl)
    write_result(args.output, result)


if __name__ == "__main__":
    main()
