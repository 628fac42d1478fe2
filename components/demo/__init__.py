"""The demo task: a synthetic review corpus, a tiny SFT policy and a hidden gold judge (DESIGN §6)."""

from .assets import DemoAssets, DemoAssetsSpec, build_demo_assets
from .judge import GOLD_JUDGE_NAME, Judge, gold_score, resolve_judge

__all__ = [
    "GOLD_JUDGE_NAME",
    "DemoAssets",
    "DemoAssetsSpec",
    "Judge",
    "build_demo_assets",
    "gold_score",
    "resolve_judge",
]
