"""The simulated annotator: a programmatic judge that stands in for humans in demos and tests.

Its labels always carry `simulated: true` and an annotator name starting with `simulated:`, so they can
never be mistaken for human feedback downstream.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.generate_candidates.step import AnnotationTask

Judge = Callable[[str, str], float]


def judges() -> dict[str, Judge]:
    from rlhf_components.demo import GOLD_JUDGE_NAME, gold_score

    return {GOLD_JUDGE_NAME: gold_score}


def resolve_judge(name: str) -> Judge:
    available = judges()
    if name not in available:
        raise UserError(f"unknown judge {name!r}; available: {', '.join(sorted(available))}")
    return available[name]


def annotate(tasks_uri: str, labels_uri: str, judge_name: str) -> int:
    """Judge every task in `tasks_uri` and write the labels where human labels would arrive."""
    judge = resolve_judge(judge_name)
    labels = []
    for _, line in storage.read_jsonl(tasks_uri):
        task = AnnotationTask.model_validate_json(line)
        score_a, score_b = judge(task.prompt, task.response_a), judge(task.prompt, task.response_b)
        choice = "tie" if score_a == score_b else ("a" if score_a > score_b else "b")
        labels.append(
            {
                "task_id": task.task_id,
                "choice": choice,
                "annotator": f"simulated:{judge_name}",
                "simulated": True,
            }
        )
    storage.write_jsonl(labels_uri, labels)
    return len(labels)
