"""The GRPO demo as a user runs it (`rlhf run examples/grpo.yaml`): held-out exact-match accuracy rises by at
least 25 points over the SFT policy's, at a bounded KL, and summary.json reports both accuracies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .test_pipeline_local import rlhf_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = Path(__file__).parents[2] / "examples" / "grpo.yaml"


def test_the_grpo_demo_teaches_exact_answers(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "grpo.yaml")
    done = rlhf_run(tmp_path / "grpo.yaml", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    sft, grpo = summary["reference_gold_score"], summary["gold_score"]
    assert grpo - sft >= 0.25, (sft, grpo)
    assert summary["kl"] < 5.0
    # Two exact-match checks written apart, the reward on the dataset's answers and the hidden checker that
    # solves each question from its text, agree on every held-out answer.
    assert summary["reward_score"] == grpo and summary["reference_reward_score"] == sft
    assert summary["promoted"] is True and summary["evaluation"]["gold_win_rate_ci_low"] > 0.5
