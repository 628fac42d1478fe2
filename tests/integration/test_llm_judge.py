"""evaluate's pairwise LLM judge against an OpenAI-compatible server running as its own process
(judge_server.py: a minimal server written for these tests, since no third-party one installs here).

Verdicts in both orders, ties, position bias cancelled, the verdict cache, the request cap, retries of 429 and
503, the API key from the environment, free-text replies of a tiny model, and judge_win_rate with its
bootstrap interval in evaluate's metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_components import evaluate
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets, gold_score
from rlhf_components.evaluate.config import JudgeConfig
from rlhf_components.evaluate.judge import PairwiseJudge
from rlhf_components.evaluate.step import win_rate

from .judge_server import requests_seen, serving

PROMPTS = ["Review of the ramen:", "Review of the lamp:", "Review of a cafe:", "Review of a desk:"]
CANDIDATE = [" lovely and great food", " it works", " awful service", " same answer"]
BASELINE = [
    " awful food",
    " great lamp, lovely",
    " awful lamp",
    " same answer",
]  # a tie by the judge, then a tie by identity
JUDGED_PAIRS = 3  # the fourth pair is two identical answers: a tie, never sent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("judge-server")) as url:
        yield url


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def judge(
    url: str, tmp_path: Path, model: str = "gold:demo-gold-sentiment", **settings: object
) -> PairwiseJudge:
    config = JudgeConfig(url=url, model=model, **settings)  # type: ignore[arg-type]
    return PairwiseJudge.open(config, str(tmp_path / "verdicts.jsonl"))


def test_verdicts_in_both_orders_are_the_judges_and_are_cached(server: str, tmp_path: Path) -> None:
    before = requests_seen(server)
    outcomes = judge(server, tmp_path).compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})["reference"]
    expected = win_rate(
        [gold_score(p, c) for p, c in zip(PROMPTS, CANDIDATE, strict=True)],
        [gold_score(p, b) for p, b in zip(PROMPTS, BASELINE, strict=True)],
    )
    assert outcomes == expected == [1.0, 0.0, 0.5, 0.5]
    assert requests_seen(server) - before == 2 * JUDGED_PAIRS

    again = judge(server, tmp_path)  # a new run reading the same cache pays for nothing
    assert again.compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})["reference"] == expected
    assert again.requests == 0 and requests_seen(server) - before == 2 * JUDGED_PAIRS


def test_a_judge_that_always_answers_a_scores_ties(server: str, tmp_path: Path) -> None:
    biased = judge(server, tmp_path, model="first")
    assert biased.compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})["reference"] == [0.5] * 4
    assert biased.unparsed == 0


def test_the_request_cap_stops_before_anything_is_spent(server: str, tmp_path: Path) -> None:
    before = requests_seen(server)
    capped = judge(server, tmp_path, max_requests=2 * JUDGED_PAIRS - 1)
    with pytest.raises(UserError, match=r"evaluate\.judge\.max_requests: .* needs 6 judge requests"):
        capped.compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})
    assert requests_seen(server) == before


def test_429_and_503_are_retried(tmp_path: Path) -> None:
    with serving(tmp_path, fail_first=3) as flaky:
        patient = judge(flaky, tmp_path, retries=3, concurrency=1)
        outcomes = patient.compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})["reference"]
        assert outcomes == [1.0, 0.0, 0.5, 0.5]
        assert requests_seen(flaky) == 3 + 2 * JUDGED_PAIRS


def test_a_missing_key_is_the_servers_401(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(UserError, match=r"evaluate\.judge: .* answered 401"):
        judge(server, tmp_path).compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})


def test_free_text_replies_of_a_tiny_model_are_counted_as_unparsed_ties(
    server: str, tmp_path: Path, tiny_assets: DemoAssets
) -> None:
    small = judge(server, tmp_path, model=f"hf:{tiny_assets.sft_model_dir}", max_tokens=4)
    outcomes = small.compare({"reference": (PROMPTS, CANDIDATE, BASELINE)})["reference"]
    # The demo's review writer never answers "A", "B" or "TIE".
    assert outcomes == [0.5] * 4
    assert small.unparsed == 2 * JUDGED_PAIRS


def test_evaluate_reports_the_judge_win_rate_with_its_interval(
    server: str, tiny_assets: DemoAssets, tmp_path: Path, run_context: RunContext
) -> None:
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS), encoding="utf-8")
    config = evaluate.Config(
        max_prompts=4,
        bootstrap_samples=200,
        gold_judge="demo-gold-sentiment",
        judge=JudgeConfig(url=server, model="gold:demo-gold-sentiment"),
        sampling={"temperature": 1.0, "max_new_tokens": 12},
    )
    inputs = evaluate.Inputs(
        candidate=tiny_assets.sft_model_dir, reference=tiny_assets.sft_model_dir, prompts=str(prompts)
    )
    metrics = evaluate.run(config, inputs, run_context).metrics
    # The served judge is the gold judge, asked in both orders: its win rate is the gold win rate.
    assert metrics["judge_win_rate"] == metrics["gold_win_rate"]
    assert metrics["judge_win_rate_ci_low"] <= metrics["judge_win_rate"] <= metrics["judge_win_rate_ci_high"]
    assert metrics["judge_unparsed_fraction"] == 0.0
    assert metrics["judge_requests"] <= 2 * len(PROMPTS)
