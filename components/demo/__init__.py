"""The demo task: a synthetic review corpus, a tiny SFT policy and a hidden gold judge (DESIGN §6)."""

from .assets import DemoAssets, DemoAssetsSpec, build_demo_assets
from .judge import GOLD_JUDGE_NAME, gold_score

__all__ = ["GOLD_JUDGE_NAME", "DemoAssets", "DemoAssetsSpec", "build_demo_assets", "gold_score"]
