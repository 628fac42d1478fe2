"""Helpers shared by the per-step unit tests (`from ._helpers import ...`).

Kept out of a conftest.py on purpose: other test files own that namespace.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.entities import Run

from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.records import Prompt
from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run
from rlhf_components.demo import gold_score
from rlhf_components.demo.grammar import sample_kind, sample_prompt, sample_review

RM_CACHE_NAME = "tiny-reward-model"


@dataclass(frozen=True)
class CliResult:
    """What an `rlhf` subprocess left behind."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line (any JSON value, so tests can write non-object rows too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Lines end at "\\n" only, as the project writes them (U+2028 in a text is not a line break)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def make_context(root: Path, experiment: str = "tests", seed: int = 0) -> RunContext:
    """A fresh sqlite MLflow store and pipeline parent run under `root` (for module/session fixtures)."""
    root.mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment=experiment)
    uri, run_id = start_pipeline_run(tracking, "test-pipeline", {"test": True}, {})
    return RunContext(
        tracking_uri=uri,
        experiment=experiment,
        parent_run_id=run_id,
        output_root=str(root / "outputs"),
        seed=seed,
    )


def child_runs(context: RunContext, step: str) -> list[Run]:
    """The MLflow runs of `step` recorded under the context's parent run."""
    mlflow.set_tracking_uri(context.tracking_uri)
    experiment = mlflow.get_experiment_by_name(context.experiment)
    assert experiment is not None
    return list(
        mlflow.MlflowClient().search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{context.parent_run_id}' and tags.`rlhf.step` = '{step}'"
            ),
        )
    )


def sentiment_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Easy preferences from the demo grammar: a clearly positive review beats a clearly negative one."""
    rng = random.Random(seed)
    pairs: list[dict[str, str]] = []
    while len(pairs) < n:
        kind = sample_kind(rng)
        prompt = sample_prompt(rng, kind)
        chosen, rejected = sample_review(rng, 1.0, kind), sample_review(rng, -1.0, kind)
        if gold_score(prompt, chosen) > gold_score(prompt, rejected):
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory, sft_model_dir: str) -> str:
    """A reward model trained for one epoch on a little easy data; built once per test session.

    Cached by path under the session's base temp dir, so every test module shares one copy.
    """
    from rlhf_components import train_reward_model

    root = tmp_path_factory.getbasetemp() / RM_CACHE_NAME
    done = root / "reward_model_path.txt"
    if done.is_file():
        return done.read_text(encoding="utf-8")
    context = make_context(root, experiment="tiny-reward-model")
    train = write_jsonl(root / "data" / "train.jsonl", sentiment_pairs(48, seed=11))
    evaluation = write_jsonl(root / "data" / "eval.jsonl", sentiment_pairs(8, seed=12))
    outputs = train_reward_model.run(
        train_reward_model.Config(epochs=1, learning_rate=1e-3, batch_size=16, max_length=64),
        train_reward_model.Inputs(base_model=sft_model_dir, train=str(train), eval=str(evaluation)),
        context,
    )
    done.write_text(outputs.reward_model, encoding="utf-8")
    return outputs.reward_model


P = "Review of the diner downtown:"


def write_feedback_in_every_format(folder: Path) -> int:
    """One feedback file of each type (JSONL, CSV, Parquet, a Label Studio export), 2 records each;
    returns the number of records."""
    write_jsonl(
        folder / "pairs.jsonl",
        [
            {"prompt": P, "chosen": "yes", "rejected": "no", "annotator": "j"},
            {"prompt": P, "response": "fine", "rating": 4, "annotator": "j"},
        ],
    )
    with (folder / "ratings.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["prompt", "response", "rating", "annotator", "responses", "ranking"])
        writer.writeheader()
        writer.writerow({"prompt": P, "response": "meh", "rating": "2", "annotator": "j"})
        writer.writerow({"prompt": "Q", "responses": json.dumps(["a", "b", "c"]), "ranking": "[1, 0, 2]"})
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "R", "response_a": "x", "response_b": "y", "choice": "a", "annotator": "k"},
                {"prompt": "R", "response_a": "x", "response_b": "y", "choice": "tie", "annotator": "l"},
            ]
        ),
        folder / "choices.parquet",
    )
    (folder / "export.json").write_text(
        json.dumps(
            [
                {
                    "id": 1,
                    "data": {"prompt": "S", "response_a": "u", "response_b": "v"},
                    "annotations": [
                        {
                            "completed_by": {"email": "m@x.org"},
                            "result": [
                                {
                                    "from_name": "choice",
                                    "to_name": "prompt",
                                    "type": "choices",
                                    "value": {"choices": ["B"]},
                                }
                            ],
                        },
                        {"was_cancelled": True, "result": []},
                    ],
                },
                {
                    "id": 2,
                    "data": {"prompt": "S", "response_a": "u", "response_b": "v"},
                    "annotations": [
                        {"completed_by": 3, "result": [{"type": "choices", "value": {"choices": ["Tie"]}}]}
                    ],
                },
                {"id": 3, "data": {"prompt": "S", "response_a": "u", "response_b": "w"}, "annotations": []},
            ]
        )
    )
    return 8


def encoded(fmt: ChatFormat, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a model sees them, left-padded: (ids, attention mask)."""
    return fmt.left_padded([fmt.prompt_ids(prompt) for prompt in prompts])
