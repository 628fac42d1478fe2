"""Side-by-side table of the JSON results in a folder (benchmarks/run.sh writes them), also as JSON; GRPO's
reward curves plotted beside it.

PPO throughput comes from repeated runs (`runs/ppo-MODEL-N.json`, `runs/trl-ppo-MODEL-N.json`): each side is
its median run, whose time split and memory are reported with it, and every run's episodes/s is listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def median_run(folder: Path, pattern: str) -> tuple[dict[str, Any], list[float]] | None:
    """(the run with the median episodes/s, the lower one of the middle two for an even count; all runs')."""
    runs = [json.loads(path.read_text()) for path in folder.glob(pattern)]
    runs.sort(key=lambda r: r["episodes_per_second"])
    if not runs:
        return None
    return runs[(len(runs) - 1) // 2], [round(r["episodes_per_second"], 2) for r in runs]


def _final_reward(run: dict[str, Any], last: int = 30) -> float:
    curve = run["reward_curve"][-last:]
    return sum(curve) / len(curve)


def grpo_rows(runs: Path) -> list[dict[str, Any]]:
    """Ours against TRL's GRPOTrainer and RLOOTrainer: median episodes/s and memory, and the learning each
    reached (mean reward of the last 30 steps, per seed), with the mean reward curves plotted."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    for advantage in ("grpo", "rloo"):
        sides = {
            side: [json.loads(p.read_text()) for p in sorted(runs.glob(f"{prefix}grpo-{advantage}-*.json"))]
            for side, prefix in (("ours", ""), ("trl", "trl-"))
        }
        if not all(sides.values()):
            continue
        row: dict[str, Any] = {"model": "arithmetic demo", "trainer": advantage}
        for side, side_runs in sides.items():
            side_runs.sort(key=lambda r: r["episodes_per_second"])
            median = side_runs[(len(side_runs) - 1) // 2]
            row[f"{side}_implementation"] = median["implementation"]
            row[f"{side}_episodes_per_second"] = round(median["episodes_per_second"], 1)
            row[f"{side}_runs_episodes_per_second"] = [round(r["episodes_per_second"], 1) for r in side_runs]
            row[f"{side}_peak_rss_mb"] = round(median["peak_rss_mb"])
            row[f"{side}_final_reward_per_seed"] = {
                r["seed"]: round(_final_reward(r), 3) for r in sorted(side_runs, key=lambda r: r["seed"])
            }
            length = min(len(r["reward_curve"]) for r in side_runs)
            curves[f"{median['implementation']}"] = [
                sum(r["reward_curve"][i] for r in side_runs) / len(side_runs) for i in range(length)
            ]
        row["device"] = sides["ours"][0]["device"]
        row["speedup"] = round(row["ours_episodes_per_second"] / row["trl_episodes_per_second"], 2)
        rows.append(row)
    if curves:
        _plot(curves, runs.parent / "grpo_reward_curves.png")
    return rows


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), curve, label=name)
    axis.set_xlabel("step (16 prompts × 8 completions)")
    axis.set_ylabel("exact-match reward (mean over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    rows = []
    for model in ("demo", "gpt2-6x512"):
        ours_runs = median_run(folder / "runs", f"ppo-{model}-*.json")
        trl_runs = median_run(folder / "runs", f"trl-ppo-{model}-*.json")
        if ours_runs is None or trl_runs is None:
            continue
        (ours, ours_all), (trl, trl_all) = ours_runs, trl_runs
        rloo_path = folder / f"trl-rloo-{model}.json"
        rloo = json.loads(rloo_path.read_text()) if rloo_path.is_file() else None
        rows.append(
            {
                "model": model,
                "trainer": "ppo",
                "device": ours["device"],
                "ours_episodes_per_second": round(ours["episodes_per_second"], 1),
                "trl_episodes_per_second": round(trl["episodes_per_second"], 1),
                "speedup": round(ours["episodes_per_second"] / trl["episodes_per_second"], 2),
                "ours_runs_episodes_per_second": ours_all,
                "trl_runs_episodes_per_second": trl_all,
                "trl_rloo_episodes_per_second": round(rloo["episodes_per_second"], 1) if rloo else None,
                "ours_seconds_per_iteration": {
                    k: round(v, 3) for k, v in ours["seconds_per_iteration"].items()
                },
                "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
                "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
                "trl_rloo_peak_rss_mb": round(rloo["peak_rss_mb"]) if rloo else None,
            }
        )
    for model in ("demo", "gpt2-6x512"):
        ours_path, trl_path = folder / f"dpo-{model}.json", folder / f"trl-dpo-{model}.json"
        if ours_path.is_file() and trl_path.is_file():
            ours, trl = json.loads(ours_path.read_text()), json.loads(trl_path.read_text())
            rows.append(
                {
                    "model": model,
                    "trainer": "dpo",
                    "ours_pairs_per_second": round(ours["pairs_per_second"], 1),
                    "trl_pairs_per_second": round(trl["pairs_per_second"], 1),
                    "speedup": round(ours["pairs_per_second"] / trl["pairs_per_second"], 2),
                    "ours_steady_pairs_per_second": round(ours["steady_pairs_per_second"], 1),
                    "trl_steady_pairs_per_second": round(trl["steady_pairs_per_second"], 1),
                    "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
                    "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
                }
            )
    rows += grpo_rows(folder / "runs")
    summary = folder / "summary.json"
    summary.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
