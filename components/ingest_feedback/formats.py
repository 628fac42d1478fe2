"""Every shape of human feedback we accept, read into one of two judgements.

A source file holds records; each record becomes judgements or is refused with a reason code:

| record | fields | becomes |
|---|---|---|
| chosen/rejected | `prompt, chosen, rejected` (text, or TRL's conversational form) | one pair judgement |
| a/b choice | `prompt, response_a, response_b, choice ∈ {a, b, tie}` | one pair judgement |
| task choice | `task_id, choice` (a task `generate_candidates` wrote) | one pair judgement |
| Likert rating | `prompt, response, rating, annotator` | one rating; pairs come from ratings later |
| ranking | `prompt, responses[], ranking[]` (indices, best first) | K·(K−1)/2 pair judgements |
| HH-RLHF | `chosen, rejected` conversations, no `prompt` | one pair judgement (prompt: the shared turns) |
| Label Studio | an exported task with `data` (a task) and `annotations` | one record per annotation |

A `prompt` is text or a conversation (a list of {role, content} messages) everywhere. In TRL's conversational
form `chosen` and `rejected` are message lists that end with the assistant's answer; HH-RLHF's shared turns
become the prompt's messages (Human: user, Assistant: assistant). Files: `.jsonl`, `.csv` (list fields as JSON
text), `.parquet`, and `.json` (a Label Studio export: a list of tasks). An `annotator` field is optional
everywhere but Likert, where ratings only compare within one annotator's scale.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.core.records import (
    AnnotationTask,
    PreferencePair,
    Prompt,
    hh_messages,
    prompt_text,
)
from rlhf_components.core.rows import BOM, Invalid, file_kind, parse_json, read_rows, unpacked, utf8_error

HH_ASSISTANT = "\n\nAssistant:"


class PairJudgement(StrictModel):
    """One annotator's choice between two answers to a prompt, stored with the answers in text order."""

    kind: Literal["pair"] = "pair"
    prompt: Prompt
    response_a: str
    response_b: str
    choice: Literal["a", "b", "tie"]
    annotator: str
    simulated: bool = False
    sources: list[str]


class RatingJudgement(StrictModel):
    kind: Literal["rating"] = "rating"
    prompt: Prompt
    response: str
    rating: float
    annotator: str
    simulated: bool = False
    sources: list[str]


Judgement = PairJudgement | RatingJudgement


class _Common(BaseModel):
    """Fields other tools add (ids, timestamps, metadata) are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")

    annotator: str = Field(default="unknown", min_length=1)
    simulated: bool = False


class ChosenRejected(_Common, PreferencePair):
    """`prompt, chosen, rejected`, also in TRL's conversational form (read as core.records reads it)."""


class ChoiceOfTwo(_Common):
    prompt: Prompt
    response_a: str
    response_b: str
    choice: Literal["a", "b", "tie"]


class TaskChoice(_Common):
    task_id: str = Field(min_length=1)
    choice: Literal["a", "b", "tie"]


class Rating(_Common):
    prompt: Prompt
    response: str
    rating: float
    annotator: str = Field(min_length=1)

    @field_validator("rating", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # `true` is not a rating of 1
            raise ValueError("a rating is a number, not true or false")
        return value


class Ranking(_Common):
    prompt: Prompt
    responses: list[str] = Field(min_length=2)
    ranking: list[int] = Field(description="indices into responses, best first")


class Conversations(_Common):
    chosen: str
    rejected: str


def pair(
    prompt: Prompt,
    first: str,
    second: str,
    preferred: Literal["first", "second", "tie"],
    common: _Common,
    source: str,
) -> PairJudgement:
    """A pair judgement with the answers in text order, so one pair has one key whoever wrote it how."""
    for text, field in ((prompt_text(prompt), "prompt"), (first, "response"), (second, "response")):
        if not text.strip():
            raise Invalid("empty_text", f"{field} is empty")
    if first.strip() == second.strip():
        raise Invalid("self_pair", "the two responses are the same text")
    swap = second < first
    choice: Literal["a", "b", "tie"] = (
        "tie" if preferred == "tie" else "a" if (preferred == "first") != swap else "b"
    )
    a, b = (second, first) if swap else (first, second)
    return PairJudgement(
        prompt=prompt,
        response_a=a,
        response_b=b,
        choice=choice,
        annotator=common.annotator,
        simulated=common.simulated or common.annotator.startswith("simulated:"),
        sources=[source],
    )


def _choice(choice: Literal["a", "b", "tie"]) -> Literal["first", "second", "tie"]:
    return "tie" if choice == "tie" else "first" if choice == "a" else "second"


class Tasks(Protocol):
    """Where a task-choice record's task is found."""

    def get(self, task_id: str, /) -> AnnotationTask | None: ...


@dataclass(frozen=True)
class Limits:
    rating_range: tuple[float, float] = (1.0, 5.0)
    max_pairs_per_ranking: int = 1000


def judgements(
    raw: object, source: str, tasks: Tasks, limits: Limits = Limits()
) -> tuple[list[Judgement], int]:
    """(the judgements in one record, how many pairs a cap left out), or Invalid."""
    if not isinstance(raw, dict):
        raise Invalid("not_an_object", "record is not an object")
    if "ranking" in raw or "responses" in raw:
        try:
            return _ranking(Ranking.model_validate(raw), source, limits.max_pairs_per_ranking)
        except ValidationError as error:
            raise Invalid(_validation_code(error), _validation_message(error)) from None
    return _single(raw, source, tasks, limits), 0


def _single(raw: dict[str, Any], source: str, tasks: Tasks, limits: Limits) -> list[Judgement]:
    """The judgement in a record of any shape but a ranking."""
    try:
        if "task_id" in raw:
            judged = TaskChoice.model_validate(raw)
            task = tasks.get(judged.task_id)
            if task is None:
                raise Invalid("unknown_task", f"unknown task_id {judged.task_id!r}")
            return [
                pair(task.prompt, task.response_a, task.response_b, _choice(judged.choice), judged, source)
            ]
        if "response_a" in raw or "response_b" in raw:
            two = ChoiceOfTwo.model_validate(raw)
            return [pair(two.prompt, two.response_a, two.response_b, _choice(two.choice), two, source)]
        if "rating" in raw:
            return [_rating(Rating.model_validate(raw), source, limits.rating_range)]
        if "prompt" in raw:
            cr = ChosenRejected.model_validate(raw)
            return [pair(cr.prompt, cr.chosen, cr.rejected, "first", cr, source)]
        if "chosen" in raw or "rejected" in raw:
            return [_conversations(Conversations.model_validate(raw), source)]
    except ValidationError as error:
        raise Invalid(_validation_code(error), _validation_message(error)) from None
    raise Invalid("unknown_format", f"no known feedback shape has the fields {sorted(raw)}")


def _rating(rating: Rating, source: str, rating_range: tuple[float, float]) -> RatingJudgement:
    low, high = rating_range
    if not low <= rating.rating <= high:
        raise Invalid("rating_out_of_range", f"rating {rating.rating} is outside [{low}, {high}]")
    if not prompt_text(rating.prompt).strip() or not rating.response.strip():
        raise Invalid("empty_text", "prompt or response is empty")
    return RatingJudgement(
        prompt=rating.prompt,
        response=rating.response,
        rating=rating.rating,
        annotator=rating.annotator,
        simulated=rating.simulated or rating.annotator.startswith("simulated:"),
        sources=[source],
    )


def _ranking(ranking: Ranking, source: str, cap: int) -> tuple[list[Judgement], int]:
    if sorted(ranking.ranking) != list(range(len(ranking.responses))):
        raise Invalid(
            "bad_ranking",
            f"ranking {ranking.ranking} is not an order of the {len(ranking.responses)} responses",
        )
    order = [ranking.responses[i] for i in ranking.ranking]
    if len({r.strip() for r in order}) < len(order):
        raise Invalid("self_pair", "the ranking lists the same response twice")
    kept, capped = pairs_by_gap(len(order), cap)
    return [pair(ranking.prompt, order[i], order[j], "first", ranking, source) for i, j in kept], capped


def pairs_by_gap(count: int, cap: int) -> tuple[list[tuple[int, int]], int]:
    """(up to `cap` index pairs i < j of `count` ranked items, how many were left out): neighbours first,
    then items two apart, and so on, so every item is in a pair before any pair of distant ones is kept.
    A ranking of K answers holds K·(K−1)/2 pairs: 1000 answers would be half a million."""
    kept: list[tuple[int, int]] = []
    for gap in range(1, count):
        for i in range(count - gap):
            if len(kept) == cap:
                return kept, count * (count - 1) // 2 - cap
            kept.append((i, i + gap))
    return kept, 0


def _conversations(record: Conversations, source: str) -> PairJudgement:
    """HH-RLHF: both texts are the same conversation up to the last assistant turn, which differs. The
    shared turns become the prompt's messages (Human: user, Assistant: assistant)."""
    chosen_turns, rejected_turns = hh_messages(record.chosen), hh_messages(record.rejected)
    ends = [turns[-1].role if turns else None for turns in (chosen_turns, rejected_turns)]
    if ends != ["assistant", "assistant"]:
        raise Invalid(
            "bad_conversation", f"a conversation does not end with an {HH_ASSISTANT.strip()!r} turn"
        )
    prompt = chosen_turns[:-1]
    if rejected_turns[:-1] != prompt:
        raise Invalid("bad_conversation", "chosen and rejected differ before the last assistant turn")
    if not prompt or prompt[-1].role != "user":
        raise Invalid("bad_conversation", "the answers do not follow a Human turn")
    return pair(prompt, chosen_turns[-1].content, rejected_turns[-1].content, "first", record, source)


def _validation_code(error: ValidationError) -> str:
    kinds = {e["type"] for e in error.errors()}
    if "missing" in kinds:
        return "missing_field"
    if "extra_forbidden" in kinds:
        return "unknown_field"
    return "bad_value"


def _validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors())


# ----------------------------------------------------------------------------- files


def records(uri: str, handle: BinaryIO) -> Iterator[tuple[str, object]]:
    """(location, record) for each record of a feedback file (core.rows: JSONL, CSV, Parquet, gzipped or not,
    a record at a time, and here Label Studio's JSON exports); a record that cannot be read at all is an
    Invalid in its place."""
    if file_kind(uri) == "json":
        yield from unpacked(uri, handle, _label_studio)
        return
    for location, row in read_rows(uri, handle):
        yield location, _from_csv(row) if file_kind(uri) == "csv" and isinstance(row, dict) else row


def _from_csv(row: dict[str, Any]) -> object:
    record: dict[str, Any] = {k: v for k, v in row.items() if v not in ("", None)}
    for field in ("responses", "ranking"):
        if isinstance(record.get(field), str):
            record[field] = parse_json(record[field])
            if isinstance(record[field], Invalid):
                return Invalid("bad_value", f"{field}: {record[field]}", json.dumps(row))
    for field in ("prompt", "chosen", "rejected"):  # a conversation's messages, as JSON text
        value = record.get(field)
        if isinstance(value, str) and value.lstrip().startswith("["):
            parsed = parse_json(value)
            if isinstance(parsed, list):
                record[field] = parsed
    if "rating" in record:
        try:
            record["rating"] = float(record["rating"])
        except ValueError:
            return Invalid("bad_value", f"rating {record['rating']!r} is not a number", json.dumps(row))
    if "simulated" in record:
        record["simulated"] = str(record["simulated"]).lower() in {"1", "true", "yes"}
    return record


LABEL_STUDIO_CHOICES = {"a": "a", "b": "b", "tie": "tie", "response a": "a", "response b": "b"}


def _label_studio(uri: str, handle: BinaryIO) -> Iterator[tuple[str, object]]:
    """A Label Studio export of our pairwise-choice config: one record per (non-cancelled) annotation. An
    export is one JSON document, read whole."""
    export = utf8_error(uri, handle) or parse_json(handle.read().removeprefix(BOM).decode("utf-8"))
    if not isinstance(export, list):
        yield uri, export if isinstance(export, Invalid) else Invalid("not_an_export", "not a list of tasks")
        return
    for index, task in enumerate(export):
        location = f"{uri}#task{index}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            yield location, Invalid("not_an_export", "task has no data object")
            continue
        for number, annotation in enumerate(task.get("annotations") or []):
            if isinstance(annotation, dict) and annotation.get("was_cancelled"):
                continue
            yield f"{location}/annotation{number}", _label_studio_record(task["data"], annotation)


def _label_studio_record(data: dict[str, Any], annotation: object) -> object:
    if not isinstance(annotation, dict):
        return Invalid("not_an_export", "annotation is not an object")
    results = annotation.get("result") or []
    if not isinstance(results, list):
        return Invalid("bad_value", "an annotation's result is not a list")
    values = [r.get("value") for r in results if isinstance(r, dict) and r.get("type") == "choices"]
    choice_values = [v for v in values if isinstance(v, dict)]
    if len(choice_values) < len(values):
        return Invalid("bad_value", "a choices result's value is not an object with `choices`")
    choices = [choice for value in choice_values for choice in (value.get("choices") or [])]
    if len(choices) != 1 or str(choices[0]).lower() not in LABEL_STUDIO_CHOICES:
        return Invalid("bad_value", f"expected one choice of A, B or Tie, got {choices}")
    completed_by = annotation.get("completed_by")
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    record = {
        "choice": LABEL_STUDIO_CHOICES[str(choices[0]).lower()],
        "annotator": f"label-studio:{completed_by}" if completed_by is not None else "label-studio",
    }
    if "task_id" in data:
        return {**record, "task_id": data["task_id"]}
    return {**record, **{k: data.get(k) for k in ("prompt", "response_a", "response_b")}}


def list_sources(prefixes: list[str]) -> tuple[list[str], list[str]]:
    """(the feedback files under each prefix — a file, a directory or an s3:// prefix —, the other files
    there, which are reported as skipped), each sorted and deduplicated."""
    found = {uri for prefix in prefixes for uri in storage.list_files(prefix)}
    readable = sorted(uri for uri in found if file_kind(uri) is not None)
    return readable, sorted(found - set(readable))
