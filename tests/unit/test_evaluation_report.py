"""The evaluation report page: which win rates, curves and plots it holds, and how it renders in a real
headless Chromium (Debian's package): every image decodes and the screenshot is not blank.

In CI (.ci/run installs Chromium and sets RLHF_REQUIRE_BROWSER=1) the browser test must run; elsewhere,
without Chromium, it skips with one line saying why."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from rlhf_components.evaluate import report

METRICS = {
    "gold_win_rate": 0.7,
    "gold_win_rate_ci_low": 0.6,
    "gold_win_rate_ci_high": 0.8,
    "rm_win_rate_vs_champion": 0.55,
    "rm_win_rate_vs_champion_ci_low": 0.4,
    "rm_win_rate_vs_champion_ci_high": 0.7,
    "rm_win_rate_length_controlled": 0.66,  # no interval: a number in the table, not a bar
    "kl": 1.5,
}
HISTORY = {
    "reward": [(i, 0.1 * i) for i in range(10)],
    "kl": [(i, 0.05 * i) for i in range(10)],
    "policy_loss": [(i, 1.0 / (i + 1)) for i in range(10)],
    "episodes_per_second": [(i, 100.0) for i in range(10)],  # not a learning curve
    "final_accuracy": [(9, 0.9)],  # one point: no curve
}


def page(tmp_path: Path, history: dict[str, list[tuple[int, float]]] = HISTORY) -> str:
    scores = ([0.1 * (i % 7) for i in range(40)], [0.05 * (i % 5) for i in range(40)])
    lengths = ([10 + i % 9 for i in range(40)], [12 + i % 4 for i in range(40)])
    examples: list[dict[str, str | float]] = [
        {"prompt": "Say <hi>", "candidate": "hi & bye", "reference": "hi"}
    ]
    return report.render(METRICS, examples, scores, lengths, "gold judge score", history, "ppo")


def test_the_page_has_every_win_rate_with_its_interval_and_the_learning_curves(tmp_path: Path) -> None:
    assert report.win_rates(METRICS) == [
        ("gold_win_rate", 0.7, 0.6, 0.8),
        ("rm_win_rate_vs_champion", 0.55, 0.4, 0.7),
    ]
    assert list(report.training_curves(HISTORY)) == ["kl", "policy_loss", "reward"]
    html = page(tmp_path)
    # win rates 1, scores 2 (distribution, against length), lengths 1, curves 3
    assert len(re.findall(r'<img alt="" src="data:image/png;base64,', html)) == 7
    assert "Training curves (ppo)" in html
    assert "Say &lt;hi&gt;" in html and "hi &amp; bye" in html  # answers are text, never markup
    assert "<script" not in html and "http" not in html  # self-contained
    alone = page(tmp_path, history={})
    assert "No training run of this pipeline run was found." in alone


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Opened beside the report: reads, inside the browser, whether each of the report's images decoded.
CHECKER = """<!DOCTYPE html><html><body><iframe src="report.html" onload="
  const images = Array.from(this.contentDocument.images);
  const decoded = images.filter(image => image.complete && image.naturalWidth > 0);
  document.body.dataset.images = decoded.length + '/' + images.length;"></iframe></body></html>"""


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("RLHF_REQUIRE_BROWSER") == "1":
            pytest.fail("the browser test must run here (RLHF_REQUIRE_BROWSER=1), but there is no chromium")
        pytest.skip("BROWSER TEST NOT RUN: no chromium (apt-get install chromium, as .ci/run does)")
    return found


def test_the_report_renders_in_a_real_browser_with_every_image(tmp_path: Path) -> None:
    chromium = _chromium()
    (tmp_path / "report.html").write_text(page(tmp_path), encoding="utf-8")
    (tmp_path / "check.html").write_text(CHECKER, encoding="utf-8")
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--allow-file-access-from-files", "--virtual-time-budget=10000",
         "--dump-dom", (tmp_path / "check.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert 'data-images="7/7"' in dom, dom[:500]

    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--window-size=1200,2400", f"--screenshot={shot}",
         (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        assert pixels.size == (1200, 2400)
        colours = pixels.getcolors(maxcolors=1 << 20) or []
    # Plots in colour on a white page: many colours, and most of the page not one flat colour.
    assert len(colours) > 50
    assert max(count for count, _ in colours) < 0.97 * 1200 * 2400
