"""collect_prompts: JSONL/CSV sources, normalised dedupe, length filter, quarantine, hash split, manifest."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from rlhf_components import collect_prompts
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import normalize, prompt_id
from rlhf_components.core.splits import is_eval
from rlhf_components.core.tracking import RunContext

from ._helpers import child_runs, make_context, read_jsonl, write_jsonl


def _run(sources: list[str], context: RunContext, **overrides: object) -> collect_prompts.Outputs:
    config = collect_prompts.Config.model_validate(
        {"sources": sources, "min_chars": 3, "max_chars": 60, "eval_fraction": 0.3, **overrides}
    )
    return collect_prompts.run(config, collect_prompts.Inputs(), context)


def _mixed_sources(root: Path) -> tuple[Path, Path]:
    """A JSONL and a CSV file whose every row has one known fate."""
    jsonl_lines = [
        json.dumps({"prompt": "Review of the diner downtown:"}),  # 1 kept
        json.dumps({"prompt": "Review of the diner downtown:"}),  # 2 exact duplicate
        json.dumps({"prompt": "  Review   of the\tdiner downtown:  "}),  # 3 whitespace duplicate
        json.dumps({"prompt": "Ｒｅｖｉｅｗ of the diner downtown:"}),  # 4 NFKC duplicate
        json.dumps({"prompt": "Cafe\u0301 on the corner:"}),  # 5 kept (decomposed é)
        json.dumps({"prompt": "Caf\u00e9 on the corner:"}),  # 6 NFC duplicate of 5
        json.dumps({"prompt": "ab"}),  # 7 too short
        json.dumps({"prompt": "x" * 61}),  # 8 too long
        '{"prompt": "broken',  # 9 malformed JSON
        json.dumps({"text": "no prompt field here"}),  # 10 missing field
        json.dumps({"prompt": 42}),  # 11 non-text field
        "",  # blank: not a row
        json.dumps(["a", "list"]),  # 13 not an object
        json.dumps({"prompt": "My review of the blender I got as a gift:"}),  # 14 kept
    ]
    jsonl = root / "src" / "a.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("\n".join(jsonl_lines) + "\n", encoding="utf-8")
    csv_file = root / "src" / "b.csv"
    csv_file.write_text(
        "prompt,topic\n"
        '"What I thought of the bakery by the river:",food\n'  # line 2 kept
        '"review of the DINER downtown:",food\n'  # line 3 case-folded duplicate of jsonl 1
        "no,x\n"  # line 4 too short
        "short\n"  # line 5 kept (topic column missing is fine)
        '"Review of the keyboard from the online store:",tech\n',  # line 6 kept
        encoding="utf-8",
    )
    (root / "src" / "notes.txt").write_text("not a prompt source\n", encoding="utf-8")
    return jsonl, csv_file


def test_every_row_is_accounted_for(tmp_path: Path, run_context: RunContext) -> None:
    jsonl, csv_file = _mixed_sources(tmp_path)
    outputs = _run([str(tmp_path / "src")], run_context)
    counts = outputs.counts

    assert counts["read"] == 18  # 13 non-blank JSONL lines + 5 CSV rows; the .txt file is not a source
    assert counts["kept"] == 6
    assert counts["duplicates"] == 5
    assert counts["filtered_length"] == 3
    assert counts["invalid"] == 4
    accounted = counts["kept"] + counts["duplicates"] + counts["filtered_length"] + counts["invalid"]
    assert accounted == counts["read"]
    assert counts["train"] + counts["eval"] == counts["kept"]

    kept = read_jsonl(outputs.train) + read_jsonl(outputs.eval)
    texts = sorted(row["prompt"] for row in kept)
    assert texts == sorted(
        [
            "Review of the diner downtown:",
            "Cafe\u0301 on the corner:",
            "My review of the blender I got as a gift:",
            "What I thought of the bakery by the river:",
            "short",
            "Review of the keyboard from the online store:",
        ]
    )
    # The first occurrence wins, and every record says where it came from.
    by_text = {row["prompt"]: row for row in kept}
    assert by_text["Review of the diner downtown:"]["source"] == f"{jsonl}:1"
    assert by_text["short"]["source"] == f"{csv_file}:5"
    assert all(row["id"] == prompt_id(row["prompt"]) for row in kept)
    # Text is never altered: only the dedupe key is normalised.
    assert by_text["Cafe\u0301 on the corner:"]["id"] == prompt_id(normalize("Caf\u00e9 on the corner:"))

    quarantine = read_jsonl(outputs.quarantine)
    assert len(quarantine) == counts["invalid"]
    by_location = {row["location"]: row["reason"] for row in quarantine}
    assert set(by_location) == {f"{jsonl}:{n}" for n in (9, 10, 11, 13)}
    assert "invalid JSON" in by_location[f"{jsonl}:9"]
    for n in (10, 11, 13):
        assert "'prompt'" in by_location[f"{jsonl}:{n}"]


def test_csv_missing_text_column_is_quarantined(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "prompts.csv"
    source.write_text(
        "id,prompt\n1,Review of the diner downtown:\n2\n3,Review of the bistro downtown:\n", encoding="utf-8"
    )
    outputs = _run([str(source)], run_context)
    assert outputs.counts["read"] == 3
    assert outputs.counts["kept"] == 2
    assert outputs.counts["invalid"] == 1
    [bad] = read_jsonl(outputs.quarantine)
    assert bad["location"] == f"{source}:3"
    assert "'prompt'" in bad["reason"]


def test_custom_text_field(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "q.jsonl"
    source.write_text(
        json.dumps({"question": "What is RLHF, briefly?"})
        + "\n"
        + json.dumps({"prompt": "wrong key"})
        + "\n",
        encoding="utf-8",
    )
    outputs = _run([str(source)], run_context, text_field="question")
    assert outputs.counts["kept"] == 1
    assert outputs.counts["invalid"] == 1
    assert "'question'" in read_jsonl(outputs.quarantine)[0]["reason"]


def test_named_columns_travel_with_their_prompt_into_the_hash(tmp_path: Path) -> None:
    """A GRPO dataset's reference answers: kept per prompt, part of the content hash; a row without one is
    quarantined, never silently kept without its answer."""
    source = tmp_path / "math.jsonl"
    rows = [
        {"prompt": "what is 2 + 3 ?", "answer": "5", "level": 1, "note": "dropped"},
        {"prompt": "what is 4 + 4 ?", "answer": 8, "level": 2},
        {"prompt": "what is 1 + 1 ?", "level": 1},
        {"prompt": "what is 9 - 9 ?", "answer": None, "level": 1},
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    outputs = _run(
        [str(source)], make_context(tmp_path / "a"), eval_fraction=0.0, columns=["answer", "level"]
    )
    kept = {row["prompt"]: row for row in read_jsonl(outputs.train)}
    assert {p: (r["answer"], r["level"]) for p, r in kept.items()} == {
        "what is 2 + 3 ?": ("5", 1),
        "what is 4 + 4 ?": (8, 2),
    }
    assert all("note" not in row for row in kept.values())
    assert outputs.counts["invalid_missing_column"] == 2
    reasons = [row["reason"] for row in read_jsonl(outputs.quarantine)]
    assert reasons == ["no value in column(s) answer"] * 2

    rows[0]["answer"] = "6"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    other = _run([str(source)], make_context(tmp_path / "b"), eval_fraction=0.0, columns=["answer", "level"])
    assert other.content_hash != outputs.content_hash
    with pytest.raises(ValueError, match=r"columns: \['prompt'\] already name"):
        collect_prompts.Config(sources=[str(source)], columns=["prompt"])


def test_csv_location_is_the_file_line(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "prompts.csv"
    # The row without a prompt is on line 4 of the file: line 3 is blank, and csv skips blank lines.
    source.write_text("id,prompt\n1,Review of the diner downtown:\n\n2\n", encoding="utf-8")
    outputs = _run([str(source)], run_context)
    [bad] = read_jsonl(outputs.quarantine)
    assert bad["location"] == f"{source}:4"


def test_csv_with_byte_order_mark(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "excel.csv"
    source.write_bytes("prompt,topic\nReview of the diner downtown:,food\n".encode("utf-8-sig"))
    outputs = _run([str(source)], run_context)
    assert outputs.counts["kept"] == 1


def _prompts(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"prompt": f"Prompt number {i} about the noodle bar"} for i in range(start, start + n)]


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _split(outputs: collect_prompts.Outputs) -> tuple[set[str], set[str]]:
    return {r["id"] for r in read_jsonl(outputs.train)}, {r["id"] for r in read_jsonl(outputs.eval)}


def test_split_is_deterministic_and_stable_when_prompts_are_added(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(row) + "\n" for row in _prompts(40)), encoding="utf-8")
    first = _run([str(small)], make_context(tmp_path / "run1"))
    again = _run([str(small)], make_context(tmp_path / "run2"))
    train, evaluation = _split(first)
    assert train and evaluation, "both sides of a 30% split of 40 prompts are non-empty"
    assert _split(again) == (train, evaluation)
    assert first.content_hash == again.content_hash
    assert Path(first.train).read_bytes() == Path(again.train).read_bytes()
    for prompt_ids, side in ((train, False), (evaluation, True)):
        assert all(is_eval(i, 0.3) is side for i in prompt_ids)

    # More prompts, in a different order and in a second file: no existing prompt changes side.
    big = tmp_path / "big"
    big.mkdir()
    _write(big / "1.jsonl", _prompts(60, start=40))
    _write(big / "2.jsonl", list(reversed(_prompts(40))))
    grown = _run([str(big)], make_context(tmp_path / "run3"))
    grown_train, grown_eval = _split(grown)
    assert len(grown_train | grown_eval) == 100
    assert train <= grown_train
    assert evaluation <= grown_eval


def test_manifest_and_content_hash(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in _prompts(10)), encoding="utf-8")
    outputs = _run([str(source)], run_context)
    manifest = json.loads(Path(outputs.manifest).read_text(encoding="utf-8"))
    assert manifest["row_count"] == 10 == outputs.counts["kept"]
    assert manifest["content_hash"] == outputs.content_hash
    assert len(outputs.content_hash) == 64
    assert manifest["sources"] == [str(source)]
    assert manifest["counts"] == outputs.counts

    changed = tmp_path / "changed.jsonl"
    changed.write_text(
        "".join(json.dumps(row) + "\n" for row in [*_prompts(9), {"prompt": "Something new"}]),
        encoding="utf-8",
    )
    other = _run([str(changed)], make_context(tmp_path / "other"))
    assert other.content_hash != outputs.content_hash


def test_content_hash_changes_with_prompt_case(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower.jsonl", tmp_path / "upper.jsonl"
    lower.write_text(json.dumps({"prompt": "review of the diner downtown:"}) + "\n", encoding="utf-8")
    upper.write_text(json.dumps({"prompt": "Review of the Diner Downtown:"}) + "\n", encoding="utf-8")
    a = _run([str(lower)], make_context(tmp_path / "a"), eval_fraction=0.0)
    b = _run([str(upper)], make_context(tmp_path / "b"), eval_fraction=0.0)
    assert read_jsonl(a.train)[0]["prompt"] != read_jsonl(b.train)[0]["prompt"]
    assert a.content_hash != b.content_hash


def test_max_prompts_is_counted(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in _prompts(12)), encoding="utf-8")
    outputs = _run([str(source)], run_context, max_prompts=5)
    assert outputs.counts["kept"] == 5
    assert outputs.counts["over_max_prompts"] == 7
    assert len(read_jsonl(outputs.train)) + len(read_jsonl(outputs.eval)) == 5


def test_source_without_files_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no prompt files \(\.jsonl, \.csv, \.parquet\)"):
        _run([str(empty)], run_context)
    (empty / "readme.txt").write_text("prompts go elsewhere\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(str(empty))):
        _run([str(empty)], run_context)
    with pytest.raises(UserError):
        _run([str(tmp_path / "does-not-exist")], run_context)


def test_parquet_and_saved_hf_datasets_are_sources(tmp_path: Path, run_context: RunContext) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Review of the ramen:", "n": 1}, {"prompt": None, "n": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    single = tmp_path / "single"
    lamp_and_ramen = {"prompt": ["Review  of\tthe lamp:", "Review of the ramen:"]}
    datasets.Dataset.from_dict(lamp_and_ramen).save_to_disk(single)
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"prompt": ["Ｒｅｖｉｅｗ of the lamp:"]}
            ),  # full-width letters
            "test": datasets.Dataset.from_dict({"prompt": ["Review of the blender:"]}),
        }
    ).save_to_disk(splits)
    outputs = _run([str(tmp_path / "p.parquet"), str(single), str(splits)], run_context, eval_fraction=0.0)
    prompts = {row["prompt"]: row["source"] for row in read_jsonl(outputs.train)}
    # NFKC and whitespace folding make the lamp prompts one prompt, whatever their width and spacing; the
    # first one read is kept as it was written.
    assert set(prompts) == {"Review of the ramen:", "Review  of\tthe lamp:", "Review of the blender:"}
    assert prompts["Review of the ramen:"] == f"{tmp_path / 'p.parquet'}#row1"
    assert prompts["Review of the blender:"] == f"{splits}[test]#row1"
    counts = outputs.counts
    assert counts["read"] == 6 and counts["invalid"] == 1 and counts["duplicates"] == 2
    [quarantined] = read_jsonl(outputs.quarantine)
    assert quarantined["location"] == f"{tmp_path / 'p.parquet'}#row2"


def test_only_invalid_rows_is_a_user_error(tmp_path: Path, run_context: RunContext) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"nope": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match="no usable prompts"):
        _run([str(source)], run_context)


def test_child_run_has_counts_and_dataset_input(tmp_path: Path, run_context: RunContext) -> None:
    _mixed_sources(tmp_path)
    outputs = _run([str(tmp_path / "src")], run_context)
    [run] = child_runs(run_context, "collect_prompts")
    assert run.data.tags["mlflow.parentRunId"] == run_context.parent_run_id
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key, value in outputs.counts.items():
        assert metrics[key] == value
    assert run.data.params["min_chars"] == "3"
    assert run.inputs is not None
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == outputs.content_hash[:16]
    assert outputs.manifest in dataset_input.dataset.source


SYSTEM = {"role": "system", "content": "You review places.\n\nBe brief."}
USER = {"role": "user", "content": "Review of  the diner:\n```\nmenu\n```"}


def test_conversations_from_every_file_type_are_kept_as_written(
    tmp_path: Path, run_context: RunContext
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "src"
    source.mkdir()
    write_jsonl(
        source / "chat.jsonl",
        [
            {"prompt": [SYSTEM, USER]},
            {"messages": [USER, {"role": "assistant", "content": "an answer, not part of the prompt"}]},
            {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Review the lamp?\n\nAssistant:"},
        ],
    )
    with (source / "chat.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["prompt"])
        writer.writeheader()
        writer.writerow({"prompt": json.dumps([{"role": "user", "content": "Review of the cafe:"}])})
        writer.writerow({"prompt": "[plain text that only starts with a bracket]"})
    pq.write_table(
        pa.Table.from_pylist([{"prompt": [USER, {"role": "user", "content": "and the bakery?"}]}]),
        source / "chat.parquet",
    )
    datasets.Dataset.from_dict(
        {"messages": [[SYSTEM, {"role": "user", "content": "Review of the ramen:"}]]}
    ).save_to_disk(tmp_path / "saved")
    outputs = _run([str(source), str(tmp_path / "saved")], run_context, max_chars=200, eval_fraction=0.0)
    prompts = [row["prompt"] for row in read_jsonl(outputs.train)]
    assert outputs.counts["kept"] == 7 and "invalid" not in outputs.counts
    assert [SYSTEM, USER] in prompts  # whitespace, newlines and code fences exactly as written
    assert [USER] in prompts  # the dataset's answer is not part of the prompt
    assert [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Review the lamp?"},
    ] in prompts  # HH-RLHF turns become messages
    assert [{"role": "user", "content": "Review of the cafe:"}] in prompts
    assert "[plain text that only starts with a bracket]" in prompts
    assert [USER, {"role": "user", "content": "and the bakery?"}] in prompts
    assert [SYSTEM, {"role": "user", "content": "Review of the ramen:"}] in prompts
    # The same conversation with other spacing is a duplicate.
    respaced = {**USER, "content": "review of the diner: ``` menu ```"}
    again = write_jsonl(tmp_path / "again.jsonl", [{"prompt": [SYSTEM, respaced]}])
    counts = _run([str(source / "chat.jsonl"), str(again)], run_context, max_chars=200).counts
    assert counts["duplicates"] == 1


@pytest.mark.parametrize(
    ("row", "code"),
    [
        ({"prompt": []}, "no_user_turn"),
        ({"prompt": [{"role": "user"}]}, "bad_messages"),
        ({"prompt": [{"role": "user", "content": 3}]}, "bad_messages"),
        ({"prompt": [{"role": "system", "content": "only a system turn"}]}, "no_user_turn"),
        ({"prompt": [{"role": "user", "content": "  "}]}, "empty_prompt"),
        ({"prompt": "   "}, "empty_prompt"),
        ({"messages": "not a list"}, "bad_messages"),
        ({"prompt": 42}, "bad_messages"),
        ({"text": "no prompt field"}, "missing_prompt"),
        ({"prompt": [["user", "hi"]]}, "bad_messages"),
    ],
)
def test_a_malformed_conversation_is_quarantined_with_its_reason_code(
    tmp_path: Path, run_context: RunContext, row: dict[str, object], code: str
) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Review of the ramen:"}, row])
    outputs = _run([str(source)], run_context)
    [quarantined] = read_jsonl(outputs.quarantine)
    assert quarantined["location"] == f"{source}:2" and quarantined["code"] == code
    assert outputs.counts[f"invalid_{code}"] == 1 and outputs.counts["kept"] == 1


def test_no_usable_prompts_says_why(tmp_path: Path, run_context: RunContext) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", [{"text": "wrong field"}, {"prompt": [{"role": "user"}]}])
    with pytest.raises(UserError, match=r"2 rows read; invalid: 2, invalid_bad_messages: 1, invalid_missing"):
        _run([str(source)], run_context)
