"""ingest_feedback: the simulated annotator, validation with quarantine, ties, dedupe, the invalid limit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rlhf_components import ingest_feedback
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import GOLD_JUDGE_NAME, gold_score
from rlhf_components.generate_candidates.step import AnnotationTask
from rlhf_components.ingest_feedback.step import preference_id

from ._helpers import child_runs, read_jsonl, write_jsonl

PROMPT = "Review of the diner downtown:"
GOOD = " The food was great and the service was excellent."
BAD = " The food was awful and the service was terrible."
MEH = " The food was okay."
ALSO_MEH = " The staff were fine."


def _task(task_id: str, a: str, b: str, prompt: str = PROMPT) -> dict[str, Any]:
    return AnnotationTask(
        task_id=task_id, prompt_id="p-" + task_id, prompt=prompt,
        response_a_id=f"{task_id}a", response_a=a, response_b_id=f"{task_id}b", response_b=b,
    ).model_dump()


def _ingest(
    inbox: Path, context: RunContext, tasks: Path | None = None, **config: Any
) -> ingest_feedback.Outputs:
    return ingest_feedback.run(
        ingest_feedback.Config.model_validate(config),
        ingest_feedback.Inputs(inbox=str(inbox), tasks=str(tasks) if tasks else None),
        context,
    )


def _all_preferences(outputs: ingest_feedback.Outputs) -> list[dict[str, Any]]:
    return read_jsonl(outputs.train) + read_jsonl(outputs.eval)


def test_simulated_annotator_labels_every_task_with_the_gold_judge(
    tmp_path: Path, run_context: RunContext
) -> None:
    inbox = tmp_path / "inbox"
    rows = [
        _task("t1", GOOD, BAD),                                      # a wins
        _task("t2", BAD, GOOD, prompt="My review of the blender:"),  # b wins
        _task("t3", MEH, ALSO_MEH),                                  # equal gold score: tie
        _task("t4", " Highly recommended.", MEH),                    # a wins
        _task("t5", "", " What a delight."),                         # empty answer scores -1: b wins
    ]
    tasks = write_jsonl(inbox / "tasks" / "run-1.jsonl", rows)
    outputs = _ingest(inbox, run_context, tasks=tasks, simulated_annotator=GOLD_JUDGE_NAME, eval_fraction=0.3,
                      max_invalid_fraction=0.5)

    [labels_file] = (inbox / "labels").glob("*.jsonl")
    assert labels_file.name == f"simulated-{run_context.parent_run_id}.jsonl"
    labels = read_jsonl(labels_file)
    assert [label["task_id"] for label in labels] == [row["task_id"] for row in rows]
    assert all(label["simulated"] is True for label in labels)
    assert all(label["annotator"] == f"simulated:{GOLD_JUDGE_NAME}" for label in labels)
    for label, row in zip(labels, rows, strict=True):
        score_a = gold_score(row["prompt"], row["response_a"])
        score_b = gold_score(row["prompt"], row["response_b"])
        expected = "tie" if score_a == score_b else "a" if score_a > score_b else "b"
        assert label["choice"] == expected
    assert [label["choice"] for label in labels] == ["a", "b", "tie", "a", "b"]

    # The one pair whose chosen answer is empty is quarantined, not lost.
    assert outputs.counts["read"] == 5
    assert outputs.counts["ties"] == 1
    assert outputs.counts["invalid"] == 1
    assert outputs.counts["pairs"] == 3
    preferences = _all_preferences(outputs)
    assert len(preferences) == 3
    for preference in preferences:
        assert preference["simulated"] is True
        assert preference["annotator"] == f"simulated:{GOLD_JUDGE_NAME}"
        assert gold_score(preference["prompt"], preference["chosen"]) > gold_score(
            preference["prompt"], preference["rejected"])
    assert outputs.counts["simulated"] == 3
    manifest = json.loads(Path(outputs.manifest).read_text(encoding="utf-8"))
    assert manifest["contains_simulated_labels"] is True
    assert manifest["row_count"] == 3


def test_simulated_annotator_needs_tasks(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    with pytest.raises(UserError, match="needs this run's tasks"):
        _ingest(inbox, run_context, simulated_annotator=GOLD_JUDGE_NAME)


def test_unknown_judge_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    tasks = write_jsonl(inbox / "tasks" / "t.jsonl", [_task("t1", GOOD, BAD)])
    with pytest.raises(UserError, match="unknown judge"):
        _ingest(inbox, run_context, tasks=tasks, simulated_annotator="no-such-judge")


def _hand_written_inbox(inbox: Path) -> tuple[Path, dict[int, str]]:
    """Label lines with a known fate each; returns the file and {line: expected reason fragment}."""
    write_jsonl(inbox / "tasks" / "batch.jsonl", [
        _task("t1", GOOD, BAD),
        _task("t2", MEH, GOOD),
        _task("t3", MEH, BAD),
        _task("t4", GOOD, ""),
    ])
    lines = [
        json.dumps({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "alice"}),  # 1 valid
        json.dumps({"prompt": "My review of the keyboard:", "chosen": MEH, "rejected": BAD}),  # 2 valid
        json.dumps({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "bob"}),  # 3 dup of 1
        json.dumps({"task_id": "t1", "choice": "a", "annotator": "carol"}),  # 4 dup of 1
        json.dumps({"task_id": "t2", "choice": "b", "annotator": "carol"}),  # 5 valid
        json.dumps({"task_id": "t3", "choice": "tie"}),  # 6 tie
        json.dumps({"task_id": "t-unknown", "choice": "a"}),  # 7 invalid
        json.dumps({"prompt": PROMPT, "chosen": "", "rejected": BAD}),  # 8 invalid
        json.dumps({"prompt": PROMPT, "chosen": "   ", "rejected": BAD}),  # 9 invalid
        json.dumps({"prompt": PROMPT, "chosen": GOOD, "rejected": GOOD}),  # 10 invalid
        '{"prompt": "Review of',  # 11 invalid
        "",  # blank lines are not records
        json.dumps({"task_id": "t1", "choice": "maybe"}),  # 13 invalid
        json.dumps(["chosen", "rejected"]),  # 14 invalid
        json.dumps({"task_id": "t4", "choice": "a"}),  # 15 invalid
        json.dumps({"prompt": PROMPT, "rejected": BAD}),  # 16 invalid
        json.dumps({"task_id": "t2", "choice": "a", "annotator": "dave"}),  # 17 valid
    ]
    labels = inbox / "labels" / "humans.jsonl"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reasons = {
        7: "unknown task_id 't-unknown'",
        8: "chosen",
        9: "empty response text",
        10: "same text",
        11: "invalid JSON",
        13: "choice",
        14: "not a JSON object",
        15: "empty response text",
        16: "chosen",
    }
    return labels, reasons


def test_every_record_is_accounted_for_once(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    labels, reasons = _hand_written_inbox(inbox)
    outputs = _ingest(inbox, run_context, max_invalid_fraction=1.0, eval_fraction=0.5)
    counts = outputs.counts

    assert counts["read"] == 16
    assert counts["pairs"] == 4
    assert counts["duplicates"] == 2
    assert counts["ties"] == 1
    assert counts["invalid"] == len(reasons) == 9
    assert counts["pairs"] + counts["duplicates"] + counts["ties"] + counts["invalid"] == counts["read"]

    preferences = _all_preferences(outputs)
    assert counts["train"] + counts["eval"] == len(preferences) == counts["pairs"]
    assert len({p["id"] for p in preferences}) == len(preferences)
    by_source = {p["source"]: p for p in preferences}
    assert set(by_source) == {f"{labels}:{n}" for n in (1, 2, 5, 17)}
    first = by_source[f"{labels}:1"]
    assert (first["prompt"], first["chosen"], first["rejected"]) == (PROMPT, GOOD, BAD)
    assert first["annotator"] == "alice"
    assert first["id"] == preference_id(PROMPT, GOOD, BAD)
    # task_id/choice records are joined to their task: "b" on t2 prefers response_b.
    assert (by_source[f"{labels}:5"]["chosen"], by_source[f"{labels}:5"]["rejected"]) == (GOOD, MEH)
    assert (by_source[f"{labels}:17"]["chosen"], by_source[f"{labels}:17"]["rejected"]) == (MEH, GOOD)
    assert all(p["simulated"] is False for p in preferences)
    assert counts["simulated"] == 0

    quarantine = read_jsonl(outputs.quarantine)
    assert len(quarantine) == counts["invalid"]
    by_location = {row["location"]: row for row in quarantine}
    assert set(by_location) == {f"{labels}:{n}" for n in reasons}
    for line, fragment in reasons.items():
        assert fragment in by_location[f"{labels}:{line}"]["reason"], (line, by_location[f"{labels}:{line}"])
    raw_lines = labels.read_text(encoding="utf-8").splitlines()
    for line in reasons:
        assert by_location[f"{labels}:{line}"]["record"] == raw_lines[line - 1]

    manifest = json.loads(Path(outputs.manifest).read_text(encoding="utf-8"))
    assert manifest["row_count"] == 4
    assert manifest["content_hash"] == outputs.content_hash
    assert manifest["sources"] == [str(labels)]
    assert manifest["contains_simulated_labels"] is False

    [run] = child_runs(run_context, "ingest_feedback")
    assert run.data.metrics["feedback_invalid"] == 9
    assert run.data.metrics["feedback_pairs"] == 4
    assert run.data.metrics["feedback_invalid_fraction"] == pytest.approx(9 / 16)


def test_too_many_invalid_records_fails_naming_the_worst_file(
    tmp_path: Path, run_context: RunContext
) -> None:
    inbox = tmp_path / "inbox"
    valid = [{"prompt": f"{PROMPT} {i}", "chosen": GOOD, "rejected": BAD} for i in range(8)]
    mostly_good = write_jsonl(inbox / "labels" / "a-mostly-good.jsonl", [*valid, {"prompt": PROMPT}])
    worst = inbox / "labels" / "b-worst.jsonl"
    unknown_task = json.dumps({"task_id": "nope", "choice": "a"})
    worst.write_text(f"not json\n[]\n{unknown_task}\n", encoding="utf-8")
    with pytest.raises(UserError) as raised:
        _ingest(inbox, run_context, max_invalid_fraction=0.2)
    message = str(raised.value)
    assert "33.3% of 12 records are invalid" in message
    sources = message.split("worst sources: ")[1]
    assert sources.startswith(f"{worst} (3)")
    assert f"{mostly_good} (1)" in sources
    # The quarantine is written even when the step fails, so the reasons can be read.
    quarantine = tmp_path / "outputs" / run_context.parent_run_id / "ingest_feedback" / "quarantine.jsonl"
    assert str(quarantine) in message
    assert len(read_jsonl(quarantine)) == 4

    # At the limit it passes: 4 invalid of 12 is 33.3%.
    outputs = _ingest(inbox, run_context, max_invalid_fraction=0.34)
    assert outputs.counts["pairs"] == 8


def test_simulated_marking_follows_the_annotator(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "tasks" / "t.jsonl", [_task("t1", GOOD, BAD)])
    write_jsonl(inbox / "labels" / "mixed.jsonl", [
        {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "human-1"},
        {"prompt": PROMPT, "chosen": MEH, "rejected": BAD, "annotator": f"simulated:{GOLD_JUDGE_NAME}"},
        {"prompt": PROMPT, "chosen": GOOD, "rejected": MEH, "annotator": "bot", "simulated": True},
        {"task_id": "t1", "choice": "b", "annotator": f"simulated:{GOLD_JUDGE_NAME}"},
    ])
    outputs = _ingest(inbox, run_context, eval_fraction=0.0)
    flags = {(p["chosen"], p["rejected"]): p["simulated"] for p in _all_preferences(outputs)}
    assert flags == {(GOOD, BAD): False, (MEH, BAD): True, (GOOD, MEH): True, (BAD, GOOD): True}
    assert outputs.counts["simulated"] == 3
    assert json.loads(Path(outputs.manifest).read_text(encoding="utf-8"))["contains_simulated_labels"] is True


def test_malformed_task_file_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    tasks = write_jsonl(inbox / "tasks" / "broken.jsonl", [{"task_id": "t1"}])
    write_jsonl(inbox / "labels" / "l.jsonl", [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}])
    with pytest.raises(UserError, match=re.escape(f"{tasks}:1")):
        _ingest(inbox, run_context)


def test_fewer_than_two_pairs_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "labels" / "one.jsonl", [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}])
    with pytest.raises(UserError, match="only 1 usable preference pairs"):
        _ingest(inbox, run_context)
