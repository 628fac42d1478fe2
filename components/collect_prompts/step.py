"""Prompts from files (JSONL, CSV, Parquet) and Hugging Face datasets saved to disk (`save_to_disk`), local or
s3://, into a versioned train/eval dataset with a manifest.

A prompt is plain text or a conversation (`messages`: {role, content} turns, system turns included), kept
exactly as written: only the dedupe key is normalised (Unicode NFKC, whitespace collapsed, case folded), so
the same prompt typed twice is one prompt. The `columns` a config names (a reference answer, a test case)
travel with their prompt, and into its content hash. The counts say what each filter removed: invalid rows
(quarantined with a reason code and message, counted per code), lengths out of range, duplicates, and prompts
over `max_prompts`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rlhf_components.collect_prompts.config import Config, Inputs, Outputs
from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import (
    HH_TURN,
    Message,
    Prompt,
    PromptRecord,
    hh_messages,
    prompt_id,
    prompt_text,
)
from rlhf_components.core.rows import Invalid, file_kind, read_rows
from rlhf_components.core.scratch import scratch_database
from rlhf_components.core.splits import is_eval
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run

log = logging.getLogger(__name__)

HF_DATASET_MARKERS = ("dataset_dict.json", "state.json")
SCHEMA = "CREATE TABLE prompts (id TEXT PRIMARY KEY, body TEXT NOT NULL);"


def _rows(uri: str) -> Iterator[tuple[str, Any]]:
    """(location, raw row or Invalid) for every row of one source (core.rows); a source without a file
    suffix is a saved dataset (`_source_files` checked)."""
    if file_kind(uri) is None:
        yield from _hf_dataset_rows(uri)
    else:
        with storage.reading(uri) as handle:
            yield from read_rows(uri, handle)


_MESSAGES: TypeAdapter[list[Message]] = TypeAdapter(list[Message])


def _prompt(row: Any, field: str) -> Prompt:
    """The prompt in one row: the text in `field`, or a conversation there or in `messages` (a list of
    {role, content}, or its JSON text in a CSV cell) without its trailing assistant turns. The text is kept
    exactly as written."""
    if isinstance(row, Invalid):
        raise row
    if not isinstance(row, dict):
        raise Invalid("not_an_object", f"the row is not an object with a {field!r} field")
    conversation_only = field not in row  # then `messages`, which must be a conversation
    value = row.get("messages") if conversation_only else row[field]
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(value)
            value = parsed if isinstance(parsed, list) else value
    if isinstance(value, str) and HH_TURN.match(value):
        value = [m.model_dump() for m in hh_messages(value)]  # HH-RLHF's Human:/Assistant: turns
    if isinstance(value, str) and not conversation_only:
        if not value.strip():
            raise Invalid("empty_prompt", f"field {field!r} is empty")
        return value
    if value is None or (conversation_only and "messages" not in row):
        raise Invalid("missing_prompt", f"missing or non-text field {field!r} (and no `messages`)")
    if not isinstance(value, list):
        raise Invalid(
            "bad_messages",
            f"{'messages' if conversation_only else repr(field)} is not text or a list of turns",
        )
    try:
        messages = _MESSAGES.validate_python(value)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise Invalid("bad_messages", f"messages[{where}]: {problem['msg']}") from None
    while messages and messages[-1].role == "assistant":
        messages = messages[:-1]  # a chat dataset's answer: the prompt is what comes before it
    if not messages or messages[-1].role != "user":
        raise Invalid("no_user_turn", "a conversation must end with a user turn (before any answer)")
    if any(not m.content.strip() for m in messages):
        raise Invalid("empty_prompt", "a turn of the conversation is empty")
    return messages


def _columns(row: Any, names: list[str]) -> dict[str, Any]:
    """The named columns of a (valid) row, as JSON values."""
    missing = [name for name in names if row.get(name) is None]
    if missing:
        raise Invalid("missing_column", f"no value in column(s) {', '.join(missing)}")
    try:
        return {name: json.loads(json.dumps(row[name], default=str)) for name in names}
    except ValueError as error:
        raise Invalid("bad_column", f"a column is not a JSON value: {error}") from None


def _is_hf_dataset(uri: str) -> bool:
    return any(storage.exists(storage.join(uri, marker)) for marker in HF_DATASET_MARKERS)


def _hf_dataset_rows(uri: str) -> Iterator[tuple[str, Any]]:
    """Every row of a `datasets` Dataset or DatasetDict saved with `save_to_disk`, every split, one at a time
    (the dataset itself stays memory-mapped Arrow)."""
    from datasets import DatasetDict, load_from_disk

    local = storage.local_dir(uri) if storage.is_s3(uri) else uri
    loaded = load_from_disk(str(local))
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        for number, row in enumerate(dataset, 1):
            yield (f"{uri}[{split}]#row{number}" if split else f"{uri}#row{number}"), row


def _source_files(sources: list[str]) -> list[str]:
    files: list[str] = []
    for source in sources:
        if _is_hf_dataset(source):
            files.append(source)
            continue
        found = [f for f in storage.list_files(source) if file_kind(f) in {"jsonl", "csv", "parquet"}]
        if not found:
            raise UserError(
                f"{source}: no prompt files (.jsonl, .csv, .parquet), and not a dataset saved with "
                "save_to_disk"
            )
        files.extend(found)
    return files


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "collect_prompts", config), scratch_database(SCHEMA) as kept:
        counts: Counter[str] = Counter()
        quarantine_uri = step_output(context, "collect_prompts", "quarantine.jsonl")
        files = _source_files(config.sources)
        with storage.writing_jsonl(quarantine_uri) as quarantine:
            for file_uri in files:
                for location, row in _rows(file_uri):
                    counts["read"] += 1
                    try:
                        prompt = _prompt(row, config.text_field)
                        columns = _columns(row, config.columns)
                    except Invalid as error:
                        quarantine.write({"location": location, "code": error.code, "reason": str(error)})
                        counts["invalid"] += 1
                        counts[f"invalid_{error.code}"] += 1
                        continue
                    if not config.min_chars <= len(prompt_text(prompt)) <= config.max_chars:
                        counts["filtered_length"] += 1
                        continue
                    record = PromptRecord(id=prompt_id(prompt), prompt=prompt, source=location)
                    body = json.dumps(record.model_dump(mode="json") | columns)
                    # The first of a prompt's copies is kept.
                    added = kept.execute("INSERT OR IGNORE INTO prompts VALUES (?, ?)", (record.id, body))
                    counts["duplicates"] += added.rowcount == 0
        unique = int(kept.execute("SELECT count(*) FROM prompts").fetchone()[0])
        if config.max_prompts is not None:
            counts["over_max_prompts"] = max(0, unique - config.max_prompts)
        if unique == 0:
            reasons = ", ".join(f"{key}: {n}" for key, n in sorted(counts.items()) if key != "read")
            raise UserError(
                f"collect_prompts: no usable prompts in {', '.join(config.sources)} ({counts['read']} rows "
                f"read; {reasons or 'no rows'}); reasons per row in {quarantine_uri}"
            )
        outputs = Outputs(
            train=step_output(context, "collect_prompts", "train.jsonl"),
            eval=step_output(context, "collect_prompts", "eval.jsonl"),
            quarantine=quarantine_uri,
            manifest=step_output(context, "collect_prompts", "manifest.json"),
            content_hash="",
            counts={},
        )
        digest = storage.ContentHash()
        with storage.writing_jsonl(outputs.train) as train, storage.writing_jsonl(outputs.eval) as evaluation:
            for (body,) in kept.execute(
                "SELECT body FROM prompts ORDER BY id LIMIT ?", (config.max_prompts or -1,)
            ):
                row = json.loads(body)
                digest.add({key: value for key, value in row.items() if key != "source"})
                (evaluation if is_eval(row["id"], config.eval_fraction) else train).write(row)
        counts.update(kept=train.rows + evaluation.rows, train=train.rows, eval=evaluation.rows)
        outputs = outputs.model_copy(update={"content_hash": digest.hexdigest(), "counts": dict(counts)})
        # The manifest goes last: its presence marks a complete dataset.
        storage.write_json(
            outputs.manifest,
            {
                "row_count": counts["kept"],
                "content_hash": outputs.content_hash,
                "sources": files,
                "counts": dict(counts),
            },
        )
        log_metrics(dict(counts))
        _log_dataset(outputs.manifest, outputs.content_hash, counts["kept"], config.columns)
        log.info("collect_prompts: %s", dict(counts))
        return outputs


def _log_dataset(manifest_uri: str, content_hash: str, rows: int, extra_columns: list[str]) -> None:
    """The dataset as an MLflow input: where it is, its digest, columns and row count; no rows (it can be
    large)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    class Prompts(MetaDataset):
        @property
        def profile(self) -> dict[str, int]:
            return {"num_rows": rows}

    columns = Schema([ColSpec("string", name) for name in ("id", "prompt", "source", *extra_columns)])
    dataset = Prompts(
        resolve_dataset_source(manifest_uri), name="prompts", digest=content_hash[:16], schema=columns
    )
    mlflow.log_input(dataset, context="training")
