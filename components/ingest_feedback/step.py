"""Read annotator judgements from the inbox, validate each one, and write the preference dataset.

Accepted pairwise shapes, one JSON object per line in `<inbox>/labels/*.jsonl`:
- `{prompt, chosen, rejected, annotator?}`
- `{task_id, choice: a|b|tie, annotator?}`, joined to the task it answers in `<inbox>/tasks/`
Invalid records go to a quarantine file with the reason and their location; none is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Literal

from pydantic import Field, ValidationError

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.core.errors import UserError
from rlhf_components.core.splits import is_eval
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.generate_candidates.step import AnnotationTask
from rlhf_components.ingest_feedback import simulated
from rlhf_components.ingest_feedback.config import Config, Inputs, Outputs, Preference

log = logging.getLogger(__name__)


class ChosenRejected(StrictModel):
    prompt: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    annotator: str = "unknown"
    simulated: bool = False


class TaskChoice(StrictModel):
    task_id: str = Field(min_length=1)
    choice: Literal["a", "b", "tie"]
    annotator: str = "unknown"
    simulated: bool = False


def preference_id(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{chosen}\x00{rejected}".encode()).hexdigest()[:16]


def _load_tasks(inbox: str) -> dict[str, AnnotationTask]:
    tasks: dict[str, AnnotationTask] = {}
    for uri in storage.list_files(storage.join(inbox, "tasks")):
        if uri.endswith(".jsonl"):
            for number, line in storage.read_jsonl(uri):
                try:
                    task = AnnotationTask.model_validate_json(line)
                except ValidationError as error:
                    raise UserError(f"{uri}:{number}: invalid annotation task: {_reason(error)}") from None
                tasks[task.task_id] = task
    return tasks


def _to_preference(
    raw: object, location: str, tasks: dict[str, AnnotationTask]
) -> Preference | Literal["tie"]:
    """A validated preference, "tie", or ValueError with the reason."""
    if not isinstance(raw, dict):
        raise ValueError("record is not a JSON object")
    if "task_id" in raw:
        judged = TaskChoice.model_validate(raw)
        task = tasks.get(judged.task_id)
        if task is None:
            raise ValueError(f"unknown task_id {judged.task_id!r}")
        if judged.choice == "tie":
            return "tie"
        chosen, rejected = (
            (task.response_a, task.response_b) if judged.choice == "a" else (task.response_b, task.response_a)
        )
        prompt, annotator, is_simulated = task.prompt, judged.annotator, judged.simulated
    else:
        pair = ChosenRejected.model_validate(raw)
        prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
        annotator, is_simulated = pair.annotator, pair.simulated
    if chosen.strip() == rejected.strip():
        raise ValueError("chosen and rejected are the same text")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty response text")
    return Preference(
        id=preference_id(prompt, chosen, rejected),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        annotator=annotator,
        simulated=is_simulated or annotator.startswith("simulated:"),
        source=location,
    )


def _reason(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors())
    return str(error)


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "ingest_feedback", config):
        labels_dir = storage.join(inputs.inbox, "labels")
        if config.simulated_annotator:
            if inputs.tasks is None:
                raise UserError("ingest_feedback: simulated_annotator needs this run's tasks as input")
            labelled = simulated.annotate(
                inputs.tasks,
                storage.join(labels_dir, f"simulated-{context.parent_run_id}.jsonl"),
                config.simulated_annotator,
            )
            log.info(
                "simulated annotator %s labelled %d tasks (SIMULATED labels)",
                config.simulated_annotator,
                labelled,
            )
        tasks = _load_tasks(inputs.inbox)
        counts: Counter[str] = Counter()
        invalid_by_source: Counter[str] = Counter()
        quarantine: list[dict[str, str]] = []
        preferences: dict[str, Preference] = {}
        label_files = [uri for uri in storage.list_files(labels_dir) if uri.endswith(".jsonl")]
        for uri in label_files:
            for number, line in storage.read_jsonl(uri):
                counts["read"] += 1
                location = f"{uri}:{number}"
                try:
                    result = _to_preference(json.loads(line), location, tasks)
                except (ValueError, ValidationError) as error:
                    reason = "invalid JSON" if isinstance(error, json.JSONDecodeError) else _reason(error)
                    quarantine.append({"location": location, "reason": reason, "record": line})
                    counts["invalid"] += 1
                    invalid_by_source[uri] += 1
                    continue
                if result == "tie":
                    counts["ties"] += 1
                elif result.id in preferences:
                    counts["duplicates"] += 1
                else:
                    preferences[result.id] = result
        quarantine_uri = step_output(context, "ingest_feedback", "quarantine.jsonl")
        storage.write_jsonl(quarantine_uri, quarantine)
        invalid_fraction = counts["invalid"] / max(1, counts["read"])
        log_metrics(
            {f"feedback_{key}": value for key, value in counts.items()}
            | {"feedback_invalid_fraction": invalid_fraction}
        )
        if invalid_fraction > config.max_invalid_fraction:
            worst = ", ".join(f"{uri} ({n})" for uri, n in invalid_by_source.most_common(3))
            raise UserError(
                f"ingest_feedback: {invalid_fraction:.1%} of {counts['read']} records are invalid "
                f"(limit {config.max_invalid_fraction:.1%}); worst sources: {worst}; "
                f"reasons in {quarantine_uri}"
            )
        records = sorted(preferences.values(), key=lambda p: p.id)
        if len(records) < 2:
            raise UserError(f"ingest_feedback: only {len(records)} usable preference pairs in {labels_dir}")
        train = [p.model_dump() for p in records if not is_eval(p.id, config.eval_fraction)]
        evaluation = [p.model_dump() for p in records if is_eval(p.id, config.eval_fraction)]
        counts.update(
            pairs=len(records),
            train=len(train),
            eval=len(evaluation),
            simulated=sum(p.simulated for p in records),
        )
        content_hash = storage.content_hash([p.model_dump(exclude={"source"}) for p in records])
        outputs = Outputs(
            train=step_output(context, "ingest_feedback", "train.jsonl"),
            eval=step_output(context, "ingest_feedback", "eval.jsonl"),
            quarantine=quarantine_uri,
            manifest=step_output(context, "ingest_feedback", "manifest.json"),
            content_hash=content_hash,
            counts=dict(counts),
        )
        storage.write_jsonl(outputs.train, train)
        storage.write_jsonl(outputs.eval, evaluation)
        storage.write_json(
            outputs.manifest,
            {
                "row_count": len(records),
                "content_hash": content_hash,
                "sources": label_files,
                "counts": dict(counts),
                "contains_simulated_labels": counts["simulated"] > 0,
            },
        )
        log_metrics({"feedback_pairs": len(records), "feedback_simulated_pairs": counts["simulated"]})
        log.info("ingest_feedback: %s", dict(counts))
        return outputs
