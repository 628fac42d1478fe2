"""The simulated annotator: a programmatic judge that stands in for humans in demos and tests.

Its labels always carry `simulated: true` and an annotator name starting with `simulated:`, so they can
never be mistaken for human feedback downstream.
"""

from __future__ import annotations

from rlhf_components.core import storage
from rlhf_components.core.records import AnnotationTask, prompt_text, read_records
from rlhf_components.demo.judge import resolve_judge


def annotate(tasks_uri: str, labels_uri: str, judge_name: str) -> int:
    """Judge every task in `tasks_uri` and write the labels where human labels would arrive."""
    judge = resolve_judge(judge_name)
    labels = []
    for task in read_records(tasks_uri, AnnotationTask):
        prompt = prompt_text(task.prompt)
        score_a, score_b = judge(prompt, task.response_a), judge(prompt, task.response_b)
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
