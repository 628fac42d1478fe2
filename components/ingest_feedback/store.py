"""The cumulative, versioned feedback dataset and its ledger: every feedback file is folded in once.

Layout under the dataset root (`<feedback_inbox>/dataset/` by default; local or s3://):

    v000003/judgements.jsonl   every judgement so far (pairs and ratings), each with its source locations
    v000003/ledger.jsonl       every ingested file: content hash, location, record counts, version
    v000003/manifest.json      counts and the content hash of this version
    latest.json                {"version": 3}, written last: a version exists once this names it

The ledger is keyed by content hash, so a file is ingested once even when it is copied or renamed, and a
file whose content changed is new feedback. A run that fails (too many invalid records) writes no version.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.ingest_feedback.formats import Judgement

_JUDGEMENT = TypeAdapter(Judgement)


class LedgerEntry(StrictModel):
    content_hash: str
    uri: str
    records: int
    accepted: int
    quarantined: int
    version: int


class Snapshot(StrictModel):
    version: int
    judgements: list[Judgement]
    ledger: list[LedgerEntry]

    def ingested(self) -> set[str]:
        return {entry.content_hash for entry in self.ledger}


def _version_dir(root: str, version: int) -> str:
    return storage.join(root, f"v{version:06d}")


def manifest_uri(root: str, version: int) -> str:
    return storage.join(_version_dir(root, version), "manifest.json")


def load(root: str) -> Snapshot:
    """The latest version, or an empty version 0."""
    pointer = storage.join(root, "latest.json")
    if not storage.exists(pointer):
        return Snapshot(version=0, judgements=[], ledger=[])
    version = int(storage.read_json(pointer)["version"])
    folder = _version_dir(root, version)
    judgements = [
        _JUDGEMENT.validate_json(line)
        for _, line in storage.read_jsonl(storage.join(folder, "judgements.jsonl"))
    ]
    ledger = [
        LedgerEntry.model_validate_json(line)
        for _, line in storage.read_jsonl(storage.join(folder, "ledger.jsonl"))
    ]
    return Snapshot(version=version, judgements=judgements, ledger=ledger)


def save(root: str, snapshot: Snapshot, manifest: dict[str, Any]) -> str:
    """Write `snapshot` as its version; returns the manifest's location."""
    folder = _version_dir(root, snapshot.version)
    storage.write_jsonl(
        storage.join(folder, "judgements.jsonl"), [j.model_dump(mode="json") for j in snapshot.judgements]
    )
    storage.write_jsonl(storage.join(folder, "ledger.jsonl"), [e.model_dump() for e in snapshot.ledger])
    written = manifest_uri(root, snapshot.version)
    storage.write_text(written, json.dumps(manifest, indent=2, sort_keys=True))
    storage.write_json(storage.join(root, "latest.json"), {"version": snapshot.version})
    return written
