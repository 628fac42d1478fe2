"""The records steps hand each other through datasets, and the validated readers every consumer uses.

A producing step writes these records (collect_prompts: `PromptRecord`; generate_candidates: `Candidate`,
`AnnotationTask`; ingest_feedback: `Preference`); a consuming step reads them back with `read_prompts`,
`read_pairs` or `read_records`, never with bare `json.loads`. A row that is not a valid record stops the
step with one line naming the file, the line and the field. Columns a consumer does not use are ignored,
so a user's own file may carry more than the record needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError

RecordT = TypeVar("RecordT", bound="Record")


class Record(BaseModel):
    """A dataset row: validated field by field; columns it does not name are ignored."""

    model_config = ConfigDict(extra="ignore")


class PromptRecord(Record):
    id: str
    prompt: str
    source: str


class PreferencePair(Record):
    """What a preference trainer needs of a judgement: the prompt and the better and worse answers."""

    prompt: str
    chosen: str
    rejected: str


class Preference(PreferencePair):
    """One training pair as ingest_feedback writes it: the majority of its votes."""

    id: str
    votes: int
    annotators: list[str]
    simulated: bool
    sources: list[str]


class Candidate(Record):
    id: str
    prompt_id: str
    prompt: str
    response: str
    ended_with_eos: bool
    num_tokens: int
    policy: str
    sample_index: int


class AnnotationTask(Record):
    task_id: str
    prompt_id: str
    prompt: str
    response_a_id: str
    response_a: str
    response_b_id: str
    response_b: str


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def prompt_id(text: str) -> str:
    """A prompt's identity: the same text typed twice (case, spacing, Unicode forms aside) is one prompt."""
    return hashlib.sha256(normalize(text).casefold().encode()).hexdigest()[:16]


def read_records(uri: str, record: type[RecordT]) -> list[RecordT]:
    """Every row of the JSONL file at `uri` as `record`; a bad row is a UserError naming file and line."""
    return [_validated(record, row, location) for location, row in _rows(uri)]


def read_prompts(uri: str) -> list[PromptRecord]:
    """Prompt records; a row with only `prompt` gets the prompt's content id and its line as source."""
    records = []
    for location, row in _rows(uri):
        if isinstance(row, dict):
            text = row.get("prompt")
            # Without usable text the record fails on `prompt` alone: the placeholder id is never kept.
            row = {"id": prompt_id(text) if isinstance(text, str) else "", "source": location, **row}
        records.append(_validated(PromptRecord, row, location))
    return records


def read_pairs(uri: str) -> list[PreferencePair]:
    return read_records(uri, PreferencePair)


def _rows(uri: str) -> list[tuple[str, Any]]:
    rows = []
    for number, line in storage.read_jsonl(uri):
        try:
            rows.append((f"{uri}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise UserError(f"{uri}:{number}: not valid JSON: {error.msg}") from None
    return rows


def _validated(record: type[RecordT], row: Any, location: str) -> RecordT:
    try:
        return record.model_validate(row)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'row'}: {item['msg']}"
            for item in error.errors()
        )
        raise UserError(f"{location}: not a valid {_name(record)} record: {problems}") from None


def _name(record: type[BaseModel]) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", record.__name__.removesuffix("Record")).lower()
