"""The evaluation report: one self-contained HTML page (every plot inline as PNG, no script, no external file)
that evaluate logs to MLflow and leaves as the KFP HTML artifact.

Plots: every win rate with its bootstrap interval; the score and length distributions of the candidate's and
the reference's answers; score against length; the trainer's curves from this pipeline run's MLflow records.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

WIN_RATE_SUFFIX = "_win_rate"
CURVE_HINTS = ("reward", "kl", "loss", "accuracy", "score", "entropy")
MAX_CURVES = 6


def _png(draw: Callable[[Any], None], width: float = 6.0, height: float = 3.6) -> str:
    """A figure drawn by `draw(axis)`, as an inline <img>."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(width, height))
    draw(axis)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{data}">'


def win_rates(metrics: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(name, win rate, CI low, CI high) of every win rate that has its interval."""
    found = []
    for name, value in sorted(metrics.items()):
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        if (name.endswith(WIN_RATE_SUFFIX) or f"{WIN_RATE_SUFFIX}_vs_" in name) and low is not None:
            found.append((name, value, low, high if high is not None else value))
    return found


def training_curves(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """The trainer's metrics worth a curve: several points, named like a reward, KL, loss, accuracy…"""
    curves = {name: points for name, points in sorted(history.items()) if len(points) > 1}
    chosen = [name for name in curves if any(hint in name for hint in CURVE_HINTS)][:MAX_CURVES]
    return {name: curves[name] for name in chosen}


def render(
    metrics: dict[str, float],
    examples: list[dict[str, str | float]],
    scores: tuple[list[float], list[float]],
    lengths: tuple[list[int], list[int]],
    score_name: str,
    history: dict[str, list[tuple[int, float]]],
    trainer: str | None,
) -> str:
    """The page. `scores` and `lengths`: (candidate, reference) per held-out answer; `history`: the
    trainer's metric histories (step, value), `trainer` the step that trained the candidate."""
    sections = [_metrics_table(metrics)]
    rates = win_rates(metrics)
    if rates:
        plot = _png(lambda a: _draw_win_rates(a, rates))
        sections.append(f"<h2>Win rates (95% bootstrap intervals)</h2>{plot}")
    candidate_scores, reference_scores = scores
    if candidate_scores:
        histogram = _png(lambda a: _draw_histograms(a, candidate_scores, reference_scores, score_name))
        scatter = _png(lambda a: _draw_score_vs_length(a, scores, lengths, score_name))
        sections.append(f"<h2>Scores</h2>{histogram}{scatter}")
    candidate_lengths, reference_lengths = ([float(n) for n in side] for side in lengths)
    plot = _png(lambda a: _draw_histograms(a, candidate_lengths, reference_lengths, "tokens"))
    sections.append(f"<h2>Answer lengths</h2>{plot}")
    curves = training_curves(history)
    if curves:
        plots = "".join(_png(_curve(name, points), 4.0, 2.6) for name, points in curves.items())
        sections.append(f"<h2>Training curves ({html.escape(trainer or 'trainer')})</h2>{plots}")
    else:
        sections.append("<h2>Training curves</h2><p>No training run of this pipeline run was found.</p>")
    sections.append(_examples(examples))
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Evaluation report</title><style>'
        "body{font-family:sans-serif;margin:2em;max-width:70em}img{max-width:100%;margin:.5em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "</style></head><body><h1>Evaluation report</h1>" + "".join(sections) + "</body></html>\n"
    )


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(metrics.items()))
    return f"<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _examples(examples: list[dict[str, str | float]]) -> str:
    items = "".join(
        f"<li><b>prompt</b>: {html.escape(str(e['prompt']))}<ul>"
        f"<li>candidate: {html.escape(str(e['candidate']))}</li>"
        f"<li>reference: {html.escape(str(e['reference']))}</li></ul></li>"
        for e in examples
    )
    return f"<h2>Examples</h2><ul>{items}</ul>"


def _draw_win_rates(axis: Any, rates: list[tuple[str, float, float, float]]) -> None:
    names = [name for name, *_ in rates]
    values = [value for _, value, _, _ in rates]
    errors = [[value - low for _, value, low, _ in rates], [high - value for _, value, _, high in rates]]
    axis.barh(names, values, xerr=errors, capsize=4, color="#4c78a8")
    axis.axvline(0.5, color="#888", linestyle="--", linewidth=1)
    axis.set_xlim(0.0, 1.0)
    axis.set_xlabel("win rate of the candidate")


def _draw_histograms(axis: Any, candidate: list[float], reference: list[float], label: str) -> None:
    axis.hist(reference, bins=20, alpha=0.6, label="reference (SFT)")
    axis.hist(candidate, bins=20, alpha=0.6, label="candidate")
    axis.set_xlabel(label)
    axis.set_ylabel("answers")
    axis.legend()


def _draw_score_vs_length(
    axis: Any, scores: tuple[list[float], list[float]], lengths: tuple[list[int], list[int]], label: str
) -> None:
    axis.scatter(lengths[1], scores[1], s=12, alpha=0.6, label="reference (SFT)")
    axis.scatter(lengths[0], scores[0], s=12, alpha=0.6, label="candidate")
    axis.set_xlabel("answer length (tokens)")
    axis.set_ylabel(label)
    axis.legend()


def _curve(name: str, points: list[tuple[int, float]]) -> Callable[[Any], None]:
    def draw(axis: Any) -> None:
        axis.plot([step for step, _ in points], [value for _, value in points])
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")

    return draw
