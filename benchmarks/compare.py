"""Side-by-side table of the JSON results in a folder (benchmarks/run.sh writes them), also as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    rows = []
    for model in ("demo", "gpt2-6x512"):
        ours_path, trl_path = folder / f"ppo-{model}.json", folder / f"trl-ppo-{model}.json"
        if not ours_path.is_file() or not trl_path.is_file():
            continue
        ours, trl = json.loads(ours_path.read_text()), json.loads(trl_path.read_text())
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
    summary = folder / "summary.json"
    summary.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
