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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError

RecordT = TypeVar("RecordT", bound="Record")


class Record(BaseModel):
    """A dataset row: validated field by field; columns it does not name are ignored."""

    model_config = ConfigDict(extra="ignore")


class Message(BaseModel):
    """One turn of a conversation, as chat templates and TRL's conversational datasets write it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(min_length=1, description="system, user, assistant, … (whatever the template knows)")
    content: str


Prompt = str | list[Message]
"""Plain text, or a conversation that ends with the turn the model answers (TRL's two prompt shapes)."""


class PromptRecord(Record):
    id: str
    prompt: Prompt
    source: str


class PromptRow(PromptRecord):
    """A prompt with its row's other fields (a dataset's columns: the answers a reward function checks)."""

    columns: dict[str, Any] = Field(default_factory=dict)


class PreferencePair(Record):
    """What a preference trainer needs of a judgement: the prompt and the better and worse answers.

    `chosen` and `rejected` are the answers' text; TRL's conversational form (each a list of messages ending
    with the assistant's answer, optionally after the prompt's own turns) is read as the same.
    """

    prompt: Prompt
    chosen: str
    rejected: str

    @field_validator("chosen", "rejected", mode="before")
    @classmethod
    def _answer_text(cls, value: Any, info: ValidationInfo) -> Any:
        return answer_text(value, info.data.get("prompt"))


def answer_text(value: Any, prompt: Any) -> Any:
    """An answer given as text, or in TRL's conversational form: a list of messages ending with the
    assistant's answer, optionally after the prompt's own turns. Anything else is left for validation."""
    if not isinstance(value, list):
        return value
    messages = [Message.model_validate(m) for m in value]
    before = prompt if isinstance(prompt, list) else []
    if not messages or messages[-1].role != "assistant":
        raise ValueError("a conversational answer must end with an assistant message")
    if messages[:-1] and messages[:-1] != before:
        raise ValueError("the turns before the answer must be the prompt's own turns")
    return messages[-1].content


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
    prompt: Prompt
    response: str
    ended_with_eos: bool
    num_tokens: int
    policy: str
    sample_index: int


class AnnotationTask(Record):
    task_id: str
    prompt_id: str
    prompt: Prompt
    response_a_id: str
    response_a: str
    response_b_id: str
    response_b: str


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(text: str) -> list[Message]:
    """An HH-RLHF conversation (`\\n\\nHuman: …\\n\\nAssistant: …`) as messages; text before the first
    marker is not a turn, and an empty last Assistant turn (the one a model answers) is left out."""
    parts = HH_TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [Message(role=roles[m], content=c.strip()) for m, c in zip(parts[1::2], parts[2::2], strict=True)]
    return turns[:-1] if turns and turns[-1].role == "assistant" and not turns[-1].content else turns


def normalize(text: str) -> str:
    """The text a dedupe key is made of (Unicode NFKC, whitespace collapsed); the text itself is never
    altered."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def prompt_key(prompt: Prompt) -> str:
    """One string per prompt, for grouping and as a dictionary key: the text, or a conversation's JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps([m.model_dump() for m in prompt], ensure_ascii=False, separators=(",", ":"))


def prompt_id(prompt: Prompt) -> str:
    """A prompt's identity: the same prompt typed twice (case, spacing, Unicode forms aside) is one prompt."""
    if isinstance(prompt, str):
        key = normalize(prompt)
    else:
        key = json.dumps([[m.role, normalize(m.content)] for m in prompt], ensure_ascii=False)
    return hashlib.sha256(key.casefold().encode()).hexdigest()[:16]


def prompt_text(prompt: Prompt) -> str:
    """A prompt for people and programmatic judges: the text, or the turns as `Role: content` paragraphs (a
    lone user turn is its content)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in prompt)


_PROMPT: TypeAdapter[Prompt] = TypeAdapter(Prompt)


def read_records(uri: str, record: type[RecordT]) -> list[RecordT]:
    """Every row of the JSONL file at `uri` as `record`; a bad row is a UserError naming file and line."""
    return [_validated(record, row, location) for location, row in _rows(uri)]


def read_prompts(uri: str) -> list[PromptRow]:
    """Prompt records, each with its row's other fields as `columns`; a row with only `prompt` gets the
    prompt's content id and its line as source."""
    records = []
    for location, row in _rows(uri):
        if isinstance(row, dict):
            row = {"id": _content_id(row.get("prompt")), "source": location, **row}
        record = _validated(PromptRecord, row, location)
        columns = {k: v for k, v in row.items() if k not in PromptRecord.model_fields}
        records.append(PromptRow(**dict(record), columns=columns))
    return records


def read_pairs(uri: str) -> list[PreferencePair]:
    return read_records(uri, PreferencePair)


def _content_id(prompt: Any) -> str:
    try:
        return prompt_id(_PROMPT.validate_python(prompt))
    except ValidationError:
        return ""  # the record then fails on `prompt` itself, and this id is never kept


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
