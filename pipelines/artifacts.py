"""The KFP artifacts each task leaves beside its JSON output, for the KFP UI and KFP's lineage: the prompt and
preference datasets, the trained models, the evaluation's metrics and report, the gate's decision. The data
itself stays where the steps wrote it (storage_root, the MLflow registry); an artifact describes it and names
where it is in its metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _write(artifact: Any, text: str) -> None:
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def describe_dataset(outputs_json: str, artifact: Any) -> None:
    """collect_prompts' or ingest_feedback's outputs: the file (JSON) and metadata name the splits, the
    counts and the content hash."""
    outputs = json.loads(outputs_json)
    _write(artifact, json.dumps(outputs, indent=2) + "\n")
    artifact.metadata.update(
        {key: value for key, value in outputs.items() if isinstance(value, str | int | float | bool | dict)}
    )


def describe_model(uri: str, artifact: Any, **metadata: Any) -> None:
    """A trained or registered model: where it is, and what else names it (an MLflow model version)."""
    _write(artifact, json.dumps({"uri": uri, **metadata}, indent=2) + "\n")
    artifact.metadata.update({"uri": uri, **metadata})


def trained_model(outputs_json: str, field: str, artifact: Any) -> None:
    outputs = json.loads(outputs_json)
    describe_model(outputs[field], artifact, adapter=outputs.get("adapter") or outputs.get("policy_adapter"))


def evaluation(outputs_json: str, metrics: Any, report: Any) -> None:
    """evaluate's metrics as KFP metrics (shown in the UI, compared across runs) and its HTML report."""
    from rlhf_components.core import storage

    outputs = json.loads(outputs_json)
    for name, value in sorted(outputs["metrics"].items()):
        metrics.log_metric(name, value)
    _write(report, storage.read_text(outputs["report_html"]))


def decision(outputs_json: str, markdown: Any, policy: Any, reward_model: Any) -> None:
    """register_and_promote's gate decision as Markdown, and the registered models' versions (a pipeline
    that trains no reward model says so in that artifact)."""
    outputs = json.loads(outputs_json)
    verdict = "promoted to production" if outputs["promoted"] else "not promoted"
    lines = [f"# Gate: {verdict}", "", *[f"- {reason}" for reason in outputs["reasons"]], ""]
    lines += ["| role | model | version | aliases |", "|---|---|---|---|"]
    for role, entry in outputs["registered"].items():
        lines.append(f"| {role} | {entry['name']} | {entry['version']} | {', '.join(entry['aliases'])} |")
    _write(markdown, "\n".join(lines) + "\n")
    for role, artifact in (("policy", policy), ("reward_model", reward_model)):
        entry = outputs["registered"].get(role)
        if entry is None:
            _write(artifact, "{}\n")
            artifact.metadata["registered"] = False
            continue
        describe_model(
            f"models:/{entry['name']}/{entry['version']}",
            artifact,
            registered_model=entry["name"],
            model_version=entry["version"],
            aliases=entry["aliases"],
            promoted=outputs["promoted"],
        )
