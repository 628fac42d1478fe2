"""Feedback and prompts as a hostile user or a careless export would write them: each bad record is
quarantined with its reason code while the good files of the same run are ingested, line separators inside
texts stay text, file names are read whatever their case or compression, and a ranking or a run of ratings
cannot blow up into hundreds of thousands of pairs."""

from __future__ import annotations

import csv
import gzip
import json
from itertools import combinations
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_components import collect_prompts, ingest_feedback
from rlhf_components.core.tracking import RunContext
from rlhf_components.ingest_feedback.formats import pairs_by_gap

from ._helpers import child_runs, make_context, read_jsonl, write_jsonl

P = "Review of the diner downtown:"
GOOD_FILE = [
    {"prompt": P, "chosen": "lovely", "rejected": "awful"},
    {"prompt": P, "chosen": "great", "rejected": "bad"},
]


def _ingest(inbox: Path, context: RunContext, **config: Any) -> ingest_feedback.Outputs:
    return ingest_feedback.run(
        ingest_feedback.Config.model_validate({"max_invalid_fraction": 1.0, **config}),
        ingest_feedback.Inputs(inbox=str(inbox)),
        context,
    )


def _quarantine(outputs: ingest_feedback.Outputs) -> dict[str, str]:
    return {row["location"]: row["code"] for row in read_jsonl(outputs.quarantine)}


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x1c", "\x0b"])
def test_line_separators_inside_texts_are_text_in_every_run(
    tmp_path: Path, run_context: RunContext, separator: str
) -> None:
    labels = tmp_path / "inbox" / "labels"
    chosen = f"lovely{separator}and kind"
    write_jsonl(
        labels / "a.jsonl", [{"prompt": f"{P}{separator}", "chosen": chosen, "rejected": "awful"}, *GOOD_FILE]
    )
    first = _ingest(tmp_path / "inbox", run_context)
    assert first.counts["accepted"] == 3 and first.counts["quarantined"] == 0
    write_jsonl(labels / "b.jsonl", [{"prompt": P, "chosen": "fine", "rejected": "poor"}])
    second = _ingest(tmp_path / "inbox", make_context(tmp_path / "second"))  # reads version 1 back
    assert second.dataset_version == 2 and second.counts["judgements"] == 4
    pairs = read_jsonl(second.train) + read_jsonl(second.eval)
    assert chosen in {p["chosen"] for p in pairs}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": f"Review{separator}of the lamp:"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    config = collect_prompts.Config(sources=[str(prompts)], eval_fraction=0.0)
    outputs = collect_prompts.run(config, collect_prompts.Inputs(), make_context(tmp_path / "prompts"))
    assert [row["prompt"] for row in read_jsonl(outputs.train)] == [f"Review{separator}of the lamp:"]


def test_every_kind_of_bad_input_is_quarantined_while_good_files_are_ingested(
    tmp_path: Path, run_context: RunContext
) -> None:
    labels = tmp_path / "inbox" / "labels"
    write_jsonl(labels / "good.jsonl", GOOD_FILE)
    (labels / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    (labels / "digits.jsonl").write_text(
        '{"prompt": "P", "chosen": "a", "rejected": "b", "n": ' + "9" * 5000 + "}\n", encoding="utf-8"
    )
    (labels / "empty.parquet").write_bytes(b"")
    (labels / "utf8.jsonl").write_bytes(
        b'{"prompt": "P", "chosen": "caf\xe9", "rejected": "b"}\n' + json.dumps(GOOD_FILE[0]).encode() + b"\n"
    )
    (labels / "surrogate.jsonl").write_text('{"prompt": "P", "chosen": "\\ud800", "rejected": "b"}\n')
    (labels / "bool.jsonl").write_text(
        json.dumps({"prompt": P, "response": "ok", "rating": True, "annotator": "a"}) + "\n", encoding="utf-8"
    )
    huge = "x" * (csv.field_size_limit() + 1)
    (labels / "huge.csv").write_text(
        f"prompt,chosen,rejected\n{P},{huge},no\n{P},fine,poor\n", encoding="utf-8"
    )
    task = {"id": 1, "data": {"prompt": P, "response_a": "u", "response_b": "v"}}
    (labels / "list-value.json").write_text(
        json.dumps(
            [
                {**task, "annotations": [{"result": [{"type": "choices", "value": ["A"]}]}]},
                {
                    **task,
                    "id": 2,
                    "annotations": [{"result": [{"type": "choices", "value": {"choices": ["B"]}}]}],
                },
            ]
        ),
        encoding="utf-8",
    )
    outputs = _ingest(tmp_path / "inbox", run_context)
    codes = _quarantine(outputs)
    assert codes == {
        f"{labels / 'deep.jsonl'}:1": "too_deep",
        f"{labels / 'digits.jsonl'}:1": "invalid_json",
        str(labels / "empty.parquet"): "unreadable_file",
        f"{labels / 'utf8.jsonl'}:1": "invalid_utf8",
        f"{labels / 'surrogate.jsonl'}:1": "invalid_utf8",
        f"{labels / 'bool.jsonl'}:1": "bad_value",
        f"{labels / 'huge.csv'}:2": "bad_csv_row",
        f"{labels / 'list-value.json'}#task0/annotation0": "bad_value",
    }
    # The good records of every file got in: good.jsonl's two, utf8.jsonl's second line, huge.csv's second
    # row and the Label Studio task with a proper value.
    assert outputs.counts["accepted"] == 5
    [run] = child_runs(run_context, "ingest_feedback")
    assert run.data.metrics["invalid_too_deep"] == 1 and run.data.metrics["invalid_invalid_utf8"] == 2


def test_a_byte_order_mark_costs_no_record(tmp_path: Path, run_context: RunContext) -> None:
    labels = tmp_path / "inbox" / "labels"
    labels.mkdir(parents=True)
    (labels / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in GOOD_FILE).encode()
    )
    task = {
        "id": 1,
        "data": {"prompt": P, "response_a": "u", "response_b": "v"},
        "annotations": [{"result": [{"type": "choices", "value": {"choices": ["A"]}}]}],
    }
    (labels / "export.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([task]).encode())
    outputs = _ingest(tmp_path / "inbox", run_context)
    assert outputs.counts["accepted"] == 3 and outputs.counts["quarantined"] == 0


def test_known_formats_are_read_whatever_their_case_or_compression_and_others_reported(
    tmp_path: Path, run_context: RunContext
) -> None:
    labels = tmp_path / "inbox" / "labels"
    labels.mkdir(parents=True)
    lines = "".join(
        json.dumps({"prompt": P, "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n" for i in range(5)
    )
    (labels / "upper.JSONL").write_text(lines, encoding="utf-8")
    (labels / "newline.ndjson").write_text(lines.replace("good", "fine"), encoding="utf-8")
    (labels / "packed.jsonl.gz").write_bytes(gzip.compress(lines.replace("good", "nice").encode()))
    task = {
        "id": 1,
        "data": {"prompt": P, "response_a": "u", "response_b": "v"},
        "annotations": [{"result": [{"type": "choices", "value": {"choices": ["A"]}}]}],
    }
    (labels / "export.json.gz").write_bytes(gzip.compress(json.dumps([task]).encode()))
    (labels / "broken.jsonl.gz").write_bytes(b"not gzip")
    (labels / "notes.txt").write_text("not feedback", encoding="utf-8")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": P, "chosen": "yes", "rejected": "no"}]), labels / "TABLE.PARQUET"
    )
    outputs = _ingest(tmp_path / "inbox", run_context)
    assert outputs.counts["accepted"] == 5 * 3 + 1 + 1
    assert _quarantine(outputs) == {str(labels / "broken.jsonl.gz"): "unreadable_file"}
    assert outputs.counts["files_skipped"] == 1
    [run] = child_runs(run_context, "ingest_feedback")
    skipped = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/skipped_files.json")
    assert skipped == [str(labels / "notes.txt")]


def test_pairs_by_gap_keeps_neighbours_first_and_counts_the_rest() -> None:
    assert pairs_by_gap(4, 100) == ([(0, 1), (1, 2), (2, 3), (0, 2), (1, 3), (0, 3)], 0)
    assert pairs_by_gap(4, 4) == ([(0, 1), (1, 2), (2, 3), (0, 2)], 2)
    kept, capped = pairs_by_gap(1000, 1000)
    assert len(kept) == 1000 and capped == 1000 * 999 // 2 - 1000
    assert len(set(kept)) == 1000 and all(i < j for i, j in kept)
    assert {i for pair in kept for i in pair} == set(range(1000)), "every answer is in a pair"


def test_a_long_ranking_and_many_ratings_of_one_prompt_are_capped_and_counted(
    tmp_path: Path, run_context: RunContext
) -> None:
    labels = tmp_path / "inbox" / "labels"
    responses = [f"answer {i}" for i in range(1000)]
    ratings = [
        {"prompt": "Other:", "response": r, "rating": 1 + i % 5, "annotator": "ann"}
        for i, r in enumerate(responses)
    ]
    write_jsonl(
        labels / "ranked.jsonl",
        [{"prompt": P, "responses": responses, "ranking": list(range(1000))}, *ratings],
    )
    outputs = _ingest(tmp_path / "inbox", run_context, max_pairs_per_ranking=500, max_rating_pairs=300)
    assert outputs.counts["ranking_pairs_capped"] == len(list(combinations(range(1000), 2))) - 500
    assert outputs.counts["rating_pairs_capped"] == 1000 * 999 // 2 - 300
    # 500 ranking pairs, and of the 300 closest rating pairs those with a rating gap (equal ratings tie).
    assert outputs.counts["judgements"] == 500 + 1000
    assert outputs.counts["pairs"] <= 500 + 300
