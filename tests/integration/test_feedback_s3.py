"""Feedback read from an S3 prefix (a real moto server over HTTP) and from a local folder gives the same
dataset, for every format and for random and malformed records (hypothesis), and the S3 ledger folds each
object in once."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit._helpers import read_jsonl, write_feedback_in_every_format  # tests/ is on sys.path
from unit.test_dataset_integrity import assert_nothing_lost, two_ingestions_at_once
from unit.test_feedback_properties import LINE

from rlhf_components import ingest_feedback
from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext

from .conftest import S3Server


def pairs(outputs: ingest_feedback.Outputs) -> list[dict[str, Any]]:
    splits = (outputs.train, outputs.eval)
    rows = [json.loads(line) for split in splits for _, line in storage.read_jsonl(split)]
    return sorted(({k: v for k, v in row.items() if k != "sources"} for row in rows), key=lambda r: r["id"])


def test_s3_and_local_sources_give_identical_datasets(
    s3_server: S3Server, tmp_path: Path, run_context: RunContext
) -> None:
    local_inbox = tmp_path / "inbox"
    labels = local_inbox / "labels"
    labels.mkdir(parents=True)
    records = write_feedback_in_every_format(labels)
    s3_inbox = s3_server.uri(f"feedback-{uuid.uuid4().hex[:10]}", "inbox")
    for path in labels.iterdir():
        storage.write_bytes(storage.join(s3_inbox, "labels", path.name), path.read_bytes())

    config = ingest_feedback.Config(eval_fraction=0.3)
    local = ingest_feedback.run(config, ingest_feedback.Inputs(inbox=str(local_inbox)), run_context)
    remote = ingest_feedback.run(config, ingest_feedback.Inputs(inbox=s3_inbox), run_context)
    assert local.counts == remote.counts and local.counts["read"] == records
    assert pairs(local) == pairs(remote)
    assert local.content_hash == remote.content_hash
    assert remote.dataset_manifest.startswith(s3_inbox) and remote.dataset_version == 1

    def relative(judgements: list[dict[str, Any]], root: str) -> list[dict[str, Any]]:
        return sorted(
            ({**j, "sources": sorted(s.removeprefix(root) for s in j["sources"])} for j in judgements),
            key=json.dumps,
        )

    local_judgements = read_jsonl(local_inbox / "dataset" / "v000001" / "judgements.jsonl")
    remote_file = storage.join(s3_inbox, "dataset/v000001/judgements.jsonl")
    remote_judgements = [json.loads(line) for _, line in storage.read_jsonl(remote_file)]
    assert relative(local_judgements, str(local_inbox)) == relative(remote_judgements, s3_inbox)

    again = ingest_feedback.run(config, ingest_feedback.Inputs(inbox=s3_inbox), run_context)
    assert again.dataset_version == 1 and again.counts["read"] == 0
    assert again.counts["files_already_ingested"] == 4


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=15))
def test_random_records_give_the_same_outcome_from_s3_and_from_disk(
    lines: list[bytes], s3_server: S3Server, run_context: RunContext
) -> None:
    text = b"\n".join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as temp:
        local_inbox = Path(temp, "inbox")
        (local_inbox / "labels").mkdir(parents=True)
        (local_inbox / "labels" / "random.jsonl").write_bytes(text)
        s3_inbox = s3_server.uri(f"random-{uuid.uuid4().hex[:10]}", "inbox")
        storage.write_bytes(storage.join(s3_inbox, "labels", "random.jsonl"), text)

        def outcome(inbox: str) -> tuple[str, Any, list[Any]]:
            config = ingest_feedback.Config(max_invalid_fraction=1.0)
            try:
                outputs = ingest_feedback.run(config, ingest_feedback.Inputs(inbox=inbox), run_context)
            except UserError as error:
                return "failed", str(error).split(" in dataset version")[0], []
            quarantine = [
                {**row, "location": row["location"].removeprefix(inbox)}
                for row in (json.loads(line) for _, line in storage.read_jsonl(outputs.quarantine))
            ]
            return "ok", (outputs.counts, pairs(outputs)), quarantine

        assert outcome(str(local_inbox)) == outcome(s3_inbox)


def test_two_ingestions_at_once_on_s3_both_end_in_the_dataset(s3_server: S3Server, tmp_path: Path) -> None:
    """The version claim is a conditional PUT (If-None-Match: *) on S3."""
    inbox = s3_server.uri(f"race-{uuid.uuid4().hex[:10]}", "inbox")
    assert_nothing_lost(two_ingestions_at_once(inbox, tmp_path))
