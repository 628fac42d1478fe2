"""ingest_feedback: the simulated annotator, validation with quarantine, votes and ties, the invalid limit,
the exactly-once ledger and the versioned dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rlhf_components import ingest_feedback
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import AnnotationTask
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import GOLD_JUDGE_NAME, gold_score
from rlhf_components.ingest_feedback.quality import preference_id

from ._helpers import child_runs, read_jsonl, write_jsonl

PROMPT = "Review of the diner downtown:"
GOOD = " The food was great and the service was excellent."
BAD = " The food was awful and the service was terrible."
MEH = " The food was okay."
ALSO_MEH = " The staff were fine."


def _task(task_id: str, a: str, b: str, prompt: str = PROMPT) -> dict[str, Any]:
    return AnnotationTask(
        task_id=task_id,
        prompt_id="p-" + task_id,
        prompt=prompt,
        response_a_id=f"{task_id}a",
        response_a=a,
        response_b_id=f"{task_id}b",
        response_b=b,
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
        _task("t1", GOOD, BAD),  # a wins
        _task("t2", BAD, GOOD, prompt="My review of the blender:"),  # b wins
        _task("t3", MEH, ALSO_MEH),  # equal gold score: tie
        _task("t4", " Highly recommended.", MEH),  # a wins
        _task("t5", "", " What a delight."),  # empty answer scores -1: b wins
    ]
    tasks = write_jsonl(inbox / "tasks" / "run-1.jsonl", rows)
    outputs = _ingest(
        inbox,
        run_context,
        tasks=tasks,
        simulated_annotator=GOLD_JUDGE_NAME,
        eval_fraction=0.3,
        max_invalid_fraction=0.5,
    )

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

    # The one pair whose chosen answer is empty is quarantined, not lost; the tie is kept but trains nothing.
    assert outputs.counts["read"] == 5
    assert outputs.counts["ties_dropped"] == 1
    assert outputs.counts["quarantined"] == 1
    assert outputs.counts["pairs"] == 3
    preferences = _all_preferences(outputs)
    assert len(preferences) == 3
    for preference in preferences:
        assert preference["simulated"] is True
        assert preference["annotators"] == [f"simulated:{GOLD_JUDGE_NAME}"]
        assert gold_score(preference["prompt"], preference["chosen"]) > gold_score(
            preference["prompt"], preference["rejected"]
        )
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


def _hand_written_inbox(inbox: Path) -> tuple[Path, dict[int, tuple[str, str]]]:
    """Label lines with a known fate each; returns the file and {line: (reason code, message fragment)}."""
    write_jsonl(
        inbox / "tasks" / "batch.jsonl",
        [
            _task("t1", GOOD, BAD),
            _task("t2", MEH, GOOD),
            _task("t3", MEH, BAD),
            _task("t4", GOOD, ""),
        ],
    )
    lines = [
        json.dumps({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "alice"}),  # 1 valid
        json.dumps({"prompt": "My review of the keyboard:", "chosen": MEH, "rejected": BAD}),  # 2 valid
        json.dumps({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "bob"}),  # 3 vote as 1
        json.dumps({"task_id": "t1", "choice": "a", "annotator": "carol"}),  # 4 vote as 1
        json.dumps({"task_id": "t2", "choice": "b", "annotator": "carol"}),  # 5 valid
        json.dumps({"task_id": "t3", "choice": "tie"}),  # 6 a tie vote
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
        json.dumps({"task_id": "t2", "choice": "a", "annotator": "dave"}),  # 17 valid, against carol's 5
        json.dumps({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "alice"}),  # 18 = 1 again
        json.dumps({"prompt": PROMPT, "chosen": BAD, "rejected": GOOD, "annotator": "alice"}),  # 19 ≠ 1
    ]
    labels = inbox / "labels" / "humans.jsonl"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reasons = {
        7: ("unknown_task", "unknown task_id 't-unknown'"),
        8: ("empty_text", "response is empty"),
        9: ("empty_text", "response is empty"),
        10: ("self_pair", "same text"),
        11: ("invalid_json", "invalid JSON"),
        13: ("bad_value", "choice"),
        14: ("not_an_object", "not an object"),
        15: ("empty_text", "response is empty"),
        16: ("missing_field", "chosen"),
        19: ("conflicting_duplicate", "contradicts alice's earlier judgement of this pair at"),
    }
    return labels, reasons


def test_every_record_is_accounted_for_once(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    labels, reasons = _hand_written_inbox(inbox)
    outputs = _ingest(inbox, run_context, max_invalid_fraction=1.0, eval_fraction=0.5)
    counts = outputs.counts

    assert counts["read"] == 18
    assert counts["accepted"] == 8 and counts["duplicates"] == 1  # line 18 repeats line 1
    assert counts["quarantined"] == len(reasons) == 10
    assert counts["accepted"] + counts["quarantined"] == counts["read"]
    # Votes: GOOD > BAD three times; keyboard once; t2 1:1 and t3 a tie vote: two ties, dropped.
    assert counts["pairs"] == 2 and counts["ties_dropped"] == 2

    preferences = _all_preferences(outputs)
    assert counts["train"] + counts["eval"] == len(preferences) == counts["pairs"]
    by_prompt = {p["prompt"]: p for p in preferences}
    first = by_prompt[PROMPT]
    assert (first["chosen"], first["rejected"]) == (GOOD, BAD)
    assert first["id"] == preference_id(PROMPT, GOOD, BAD)
    assert first["votes"] == 3 and first["annotators"] == ["alice", "bob", "carol"]
    assert first["sources"] == sorted(f"{labels}:{n}" for n in (1, 3, 4, 18))
    assert all(p["simulated"] is False for p in preferences)

    quarantine = read_jsonl(outputs.quarantine)
    by_location = {row["location"]: row for row in quarantine}
    assert set(by_location) == {f"{labels}:{n}" for n in reasons}
    raw_lines = labels.read_text(encoding="utf-8").splitlines()
    for line, (code, fragment) in reasons.items():
        row = by_location[f"{labels}:{line}"]
        assert row["code"] == code and fragment in row["reason"], (line, row)
        if code == "invalid_json":
            assert row["record"] == raw_lines[line - 1]
        else:
            assert json.loads(row["record"]) == json.loads(raw_lines[line - 1])

    manifest = json.loads(Path(outputs.manifest).read_text(encoding="utf-8"))
    assert manifest["row_count"] == 2 and manifest["dataset_version"] == 1
    assert manifest["content_hash"] == outputs.content_hash
    assert manifest["invalid_reasons"] == {
        "unknown_task": 1,
        "empty_text": 3,
        "self_pair": 1,
        "invalid_json": 1,
        "bad_value": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "conflicting_duplicate": 1,
    }
    # Alice, Bob and Carol agree on one pair (3 agreeing couples); Carol and Dave disagree on another.
    assert manifest["agreement"]["shared_pairs"] == 2
    assert manifest["agreement"]["raw_agreement"] == pytest.approx(3 / 4)
    assert manifest["agreement"]["annotators"]["dave"]["agrees_with_others"] == 0.0

    [run] = child_runs(run_context, "ingest_feedback")
    assert run.data.metrics["quarantined"] == 10
    assert run.data.metrics["invalid_empty_text"] == 3
    assert run.data.metrics["pairs"] == 2
    assert run.data.metrics["raw_agreement"] == pytest.approx(0.75)
    assert run.data.metrics["invalid_fraction"] == pytest.approx(10 / 18)


def test_each_file_is_folded_in_once_into_a_versioned_dataset(
    tmp_path: Path, run_context: RunContext
) -> None:
    inbox = tmp_path / "inbox"
    write_jsonl(
        inbox / "labels" / "week-1.jsonl",
        [{"prompt": f"{PROMPT} {i}", "chosen": GOOD, "rejected": BAD} for i in range(4)],
    )
    first = _ingest(inbox, run_context)
    again = _ingest(inbox, run_context)
    assert (first.dataset_version, again.dataset_version) == (1, 1)
    assert again.counts["read"] == 0 and again.counts["files_already_ingested"] == 1
    assert _all_preferences(again) == _all_preferences(first)

    # A copy under another name is the same content: still once. New content is a new version.
    (inbox / "labels" / "copy.jsonl").write_bytes((inbox / "labels" / "week-1.jsonl").read_bytes())
    write_jsonl(
        inbox / "labels" / "week-2.jsonl",
        [{"prompt": f"{PROMPT} {i}", "chosen": MEH, "rejected": BAD} for i in range(3)],
    )
    later = _ingest(inbox, run_context)
    assert later.dataset_version == 2
    assert later.counts["read"] == 3 and later.counts["files_already_ingested"] == 2
    assert later.counts["pairs"] == 7
    # Versions are incremental: each holds the files it ingested, and its own judgements.
    ledger = [e for v in ("v000001", "v000002") for e in read_jsonl(inbox / "dataset" / v / "ledger.jsonl")]
    assert [(Path(e["uri"]).name, e["version"], e["records"]) for e in ledger] == [
        ("week-1.jsonl", 1, 4),
        ("week-2.jsonl", 2, 3),
    ]
    assert len(read_jsonl(inbox / "dataset" / "v000002" / "judgements.jsonl")) == 3
    manifest = json.loads((inbox / "dataset" / "v000002" / "manifest.json").read_text())
    assert manifest["judgements"] == 7 and manifest["new_files"] == [str(inbox / "labels" / "week-2.jsonl")]
    assert json.loads((inbox / "dataset" / "latest.json").read_text()) == {"version": 2}
    assert later.dataset_manifest == str(inbox / "dataset" / "v000002" / "manifest.json")


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
    assert "33.3% of 12 new records are invalid" in message
    assert "no dataset version was written" in message
    sources = message.split("worst sources: ")[1]
    assert sources.startswith(f"{worst} (3)")
    assert f"{mostly_good} (1)" in sources
    # The quarantine is written even when the step fails, so the reasons can be read.
    quarantine = tmp_path / "outputs" / run_context.parent_run_id / "ingest_feedback" / "quarantine.jsonl"
    assert str(quarantine) in message
    assert len(read_jsonl(quarantine)) == 4

    # Nothing was folded in, so the same files are read again; at the limit it passes: 4 of 12 is 33.3%.
    assert not (inbox / "dataset").exists()
    outputs = _ingest(inbox, run_context, max_invalid_fraction=0.34)
    assert outputs.counts["pairs"] == 8 and outputs.dataset_version == 1


def test_simulated_marking_follows_the_annotator(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "tasks" / "t.jsonl", [_task("t1", ALSO_MEH, BAD)])
    write_jsonl(
        inbox / "labels" / "mixed.jsonl",
        [
            {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "annotator": "human-1"},
            {"prompt": PROMPT, "chosen": MEH, "rejected": BAD, "annotator": f"simulated:{GOLD_JUDGE_NAME}"},
            {"prompt": PROMPT, "chosen": GOOD, "rejected": MEH, "annotator": "bot", "simulated": True},
            {"task_id": "t1", "choice": "b", "annotator": f"simulated:{GOLD_JUDGE_NAME}"},
        ],
    )
    outputs = _ingest(inbox, run_context, eval_fraction=0.0)
    flags = {(p["chosen"], p["rejected"]): p["simulated"] for p in _all_preferences(outputs)}
    assert flags == {(GOOD, BAD): False, (MEH, BAD): True, (GOOD, MEH): True, (BAD, ALSO_MEH): True}
    assert outputs.counts["simulated"] == 3
    assert json.loads(Path(outputs.manifest).read_text(encoding="utf-8"))["contains_simulated_labels"] is True


def test_malformed_task_file_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    tasks = write_jsonl(inbox / "tasks" / "broken.jsonl", [{"task_id": "t1"}])
    # Task files are read when a record names a task.
    write_jsonl(
        inbox / "labels" / "l.jsonl",
        [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}, {"task_id": "t1", "choice": "a"}],
    )
    with pytest.raises(UserError, match=re.escape(f"{tasks}:1")):
        _ingest(inbox, run_context)


def test_fewer_than_two_pairs_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "labels" / "one.jsonl", [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}])
    with pytest.raises(UserError, match="only 1 usable preference pairs"):
        _ingest(inbox, run_context)
