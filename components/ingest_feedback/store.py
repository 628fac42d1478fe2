"""The cumulative, versioned feedback dataset and its ledger: every feedback file is folded in once.

Layout under the dataset root (`<feedback_inbox>/dataset/` by default; local or s3://):

    v000003/claim.json         who took version 3: created only if absent, so two ingestions never share one
    v000003/judgements.jsonl   the judgements version 3 added or changed (a new source of an earlier one)
    v000003/ledger.jsonl       the files version 3 ingested: content hash, location, record counts
    v000003/manifest.json      its parent version, counts, each file's sha256, the dataset's content hash
    latest.json                {"version": 3}, written last: a version exists once this names it

A version holds what it changed (older versions' files are never rewritten); loading walks from version 1 to
the latest, checks every file against its manifest, and checks the merged dataset against the latest
manifest's content hash. A truncated, edited or missing file is an error that names it; nothing restarts
silently at version 1. Versions written before this layout (each a full copy, without `parent`) still load.

The ledger is keyed by content hash, so a file is ingested once even when it is copied or renamed, and a
file whose content changed is new feedback. A run that fails (too many invalid records) writes no version.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.core.errors import UserError
from rlhf_components.ingest_feedback.formats import Judgement, identity

_JUDGEMENT: TypeAdapter[Judgement] = TypeAdapter(Judgement)
FORMAT = 2
STALE_CLAIM_SECONDS = 600


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


class VersionTaken(Exception):
    """Another ingestion claimed the version this one was about to write."""


def _version_dir(root: str, version: int) -> str:
    return storage.join(root, f"v{version:06d}")


def manifest_uri(root: str, version: int) -> str:
    return storage.join(_version_dir(root, version), "manifest.json")


def content_hash(judgements: list[Judgement]) -> str:
    return storage.content_hash([j.model_dump(mode="json", exclude={"sources"}) for j in judgements])


def load(root: str) -> Snapshot:
    """The latest version, checked file by file, or an empty version 0 where there is no dataset yet."""
    pointer = storage.join(root, "latest.json")
    if not storage.exists(pointer):
        versions = sorted(f.split("/")[-2] for f in storage.list_files(root) if f.endswith("/manifest.json"))
        if versions:
            raise UserError(
                f"{pointer} is missing, but the dataset has versions {versions[0]}..{versions[-1]}: restore "
                f'it ({{"version": N}}, the newest complete version) rather than start again at version 1'
            )
        return Snapshot(version=0, judgements=[], ledger=[])
    latest = _read_json(pointer).get("version")
    if not isinstance(latest, int) or latest < 1:
        raise UserError(f'{pointer}: not a dataset pointer ({{"version": N}})')
    judgements: dict[tuple[str, ...], Judgement] = {}
    ledger: list[LedgerEntry] = []
    manifest: dict[str, Any] = {}
    for version in range(_base_version(root, latest), latest + 1):
        manifest = _read_json(manifest_uri(root, version))
        if "parent" not in manifest:  # a full copy, the layout before FORMAT 2
            judgements, ledger = {}, []
        delta = _judgements(root, version, manifest)
        judgements.update((identity(j), j) for j in delta)
        ledger.extend(_ledger(root, version, manifest))
    merged = list(judgements.values())
    if manifest.get("content_hash") not in (None, content_hash(merged)):
        raise UserError(
            f"{manifest_uri(root, latest)}: the dataset's judgements do not add up to its content hash: a "
            "version's files were edited or replaced"
        )
    return Snapshot(version=latest, judgements=merged, ledger=ledger)


def _base_version(root: str, latest: int) -> int:
    """The newest full copy at or before `latest` (version 1 in this layout, where version 1 is complete)."""
    for version in range(latest, 0, -1):
        if "parent" not in _read_json(manifest_uri(root, version)):
            return version
    return 1


def _judgements(root: str, version: int, manifest: dict[str, Any]) -> list[Judgement]:
    uri = storage.join(_version_dir(root, version), "judgements.jsonl")
    text = _checked(uri, manifest)
    try:
        found = [_JUDGEMENT.validate_json(line) for _, line in storage.jsonl_lines(text)]
    except ValidationError as error:
        raise UserError(f"{uri}: not a judgements file: {error.errors()[0]['msg']}") from None
    expected = manifest.get("new_judgements", manifest.get("judgements"))
    if expected is not None and len(found) != expected:
        raise UserError(
            f"{uri}: holds {len(found)} judgements, its manifest says {expected}: the file is damaged"
        )
    return found


def _ledger(root: str, version: int, manifest: dict[str, Any]) -> list[LedgerEntry]:
    uri = storage.join(_version_dir(root, version), "ledger.jsonl")
    text = _checked(uri, manifest)
    try:
        return [LedgerEntry.model_validate_json(line) for _, line in storage.jsonl_lines(text)]
    except ValidationError as error:
        raise UserError(f"{uri}: not a ledger file: {error.errors()[0]['msg']}") from None


def _checked(uri: str, manifest: dict[str, Any]) -> str:
    """A version's file, with its sha256 checked against the manifest (where the manifest records one)."""
    if not storage.exists(uri):
        raise UserError(f"{uri}: missing from its dataset version; restore it")
    data = storage.read_bytes(uri)
    expected = manifest.get("sha256", {}).get(uri.rsplit("/", 1)[-1])
    if expected is not None and storage.sha256_hex(data) != expected:
        raise UserError(f"{uri}: does not match its manifest's sha256: the file was truncated or edited")
    return data.decode("utf-8")


def _read_json(uri: str) -> dict[str, Any]:
    if not storage.exists(uri):
        raise UserError(f"{uri}: missing from the dataset; restore it")
    try:
        value = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{uri}: not valid JSON ({error}): the file is damaged") from None
    if not isinstance(value, dict):
        raise UserError(f"{uri}: not a JSON object: the file is damaged")
    return value


def save(
    root: str,
    base: Snapshot,
    changed: list[Judgement],
    new_entries: list[LedgerEntry],
    merged: list[Judgement],
    summary: dict[str, Any],
    claimant: str,
) -> str:
    """Write version `base.version + 1`: the judgements it added or changed and its ledger entries. Claims the
    version first (VersionTaken when another ingestion has it), moves the pointer last; returns the
    manifest's location."""
    version = base.version + 1
    folder = _version_dir(root, version)
    claim = json.dumps({"claimant": claimant, "time": time.time()}).encode()
    if not storage.create_exclusive(storage.join(folder, "claim.json"), claim):
        _raise_if_abandoned(root, version)
        raise VersionTaken(f"version {version} of {root} was taken by another ingestion")
    files = {
        "judgements.jsonl": storage.jsonl_text([j.model_dump(mode="json") for j in changed]),
        "ledger.jsonl": storage.jsonl_text([e.model_dump() for e in new_entries]),
    }
    for name, text in files.items():
        storage.write_text(storage.join(folder, name), text)
    manifest = {
        **summary,
        "format": FORMAT,
        "version": version,
        "parent": base.version,
        "new_judgements": len(changed),
        "judgements": len(merged),
        "content_hash": content_hash(merged),
        "sha256": {name: storage.sha256_hex(text.encode("utf-8")) for name, text in files.items()},
    }
    written = manifest_uri(root, version)
    storage.write_text(written, json.dumps(manifest, indent=2, sort_keys=True))
    storage.write_json(storage.join(root, "latest.json"), {"version": version})
    return written


def _raise_if_abandoned(root: str, version: int) -> None:
    """A claim whose version never got its manifest, long after: an ingestion died while writing it."""
    claim_uri = storage.join(_version_dir(root, version), "claim.json")
    if storage.exists(manifest_uri(root, version)):
        return
    claimed = _read_json(claim_uri).get("time", 0)
    if time.time() - float(claimed) > STALE_CLAIM_SECONDS:
        raise UserError(
            f"{_version_dir(root, version)} was claimed {time.time() - float(claimed):.0f} s ago and never "
            "completed (an ingestion died while writing it): remove that folder and run again"
        )
