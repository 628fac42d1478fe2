"""The cumulative, versioned feedback dataset and its ledger: every feedback file is folded in once.

Layout under the dataset root (`<feedback_inbox>/dataset/` by default; local or s3://):

    v000003/claim.json         who took version 3: created only if absent, so two ingestions never share one
    v000003/judgements.jsonl   the judgements version 3 added or changed (a new source of an earlier one)
    v000003/ledger.jsonl       the files version 3 ingested: content hash, location, record counts
    v000003/manifest.json      its parent version, counts, each file's sha256, the dataset's content hash
    v000003/pairs-<digest>/    the training pairs made from version 3 with one set of pair settings (pairs.py)
    latest.json                {"version": 3}, written last: a version exists once this names it

A version holds what it changed (older versions' files are never rewritten); loading walks from version 1 to
the latest, streams every file, checked against its manifest, into a JudgementIndex (index.py: on disk, not
in memory), and checks the merged dataset against the latest manifest's content hash. A truncated, edited or
missing file is an error that names it; nothing restarts silently at version 1 (a reader that finds version 1
claimed moments ago and no pointer yet waits for its writer to move the pointer). Versions written before this
layout (each a full copy, without `parent`) still load.

The ledger is keyed by content hash, so a file is ingested once even when it is copied or renamed, and a
file whose content changed is new feedback. A run that fails (too many invalid records) writes no version.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from pydantic import TypeAdapter, ValidationError

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel
from rlhf_components.core.errors import UserError
from rlhf_components.ingest_feedback.formats import Judgement
from rlhf_components.ingest_feedback.index import JudgementIndex

_JUDGEMENT: TypeAdapter[Judgement] = TypeAdapter(Judgement)
FORMAT = 2
STALE_CLAIM_SECONDS = 600
POINTER_WAIT_SECONDS = 30


class LedgerEntry(StrictModel):
    content_hash: str
    uri: str
    records: int
    accepted: int
    quarantined: int
    version: int


class Snapshot(StrictModel):
    """A dataset version's number and ledger; its judgements, where loaded, are in a JudgementIndex."""

    version: int
    ledger: list[LedgerEntry]

    def ingested(self) -> set[str]:
        return {entry.content_hash for entry in self.ledger}


class VersionTaken(Exception):
    """Another ingestion claimed the version this one was about to write."""


def version_dir(root: str, version: int) -> str:
    return storage.join(root, f"v{version:06d}")


def manifest_uri(root: str, version: int) -> str:
    return storage.join(version_dir(root, version), "manifest.json")


def head(root: str) -> Snapshot:
    """The latest version's number and ledger, read without its judgements."""
    return _walk(root, None)


def load(root: str, index: JudgementIndex) -> Snapshot:
    """The latest version, checked file by file, with its judgements merged into the (empty) `index`; an
    empty version 0 where there is no dataset yet."""
    return _walk(root, index)


def _walk(root: str, index: JudgementIndex | None) -> Snapshot:
    pointer = storage.join(root, "latest.json")
    if not _pointer_exists(root, pointer):
        versions = sorted(f.split("/")[-2] for f in storage.list_files(root) if f.endswith("/manifest.json"))
        if versions:
            raise UserError(
                f"{pointer} is missing, but the dataset has versions {versions[0]}..{versions[-1]}: restore "
                f'it ({{"version": N}}, the newest complete version) rather than start again at version 1'
            )
        return Snapshot(version=0, ledger=[])
    latest = _read_json(pointer).get("version")
    if not isinstance(latest, int) or latest < 1:
        raise UserError(f'{pointer}: not a dataset pointer ({{"version": N}})')
    ledger: list[LedgerEntry] = []
    manifest: dict[str, Any] = {}
    for version in range(_base_version(root, latest), latest + 1):
        manifest = _read_json(manifest_uri(root, version))
        if index is not None:
            _merge_judgements(root, version, manifest, index)
        ledger.extend(_ledger(root, version, manifest))
    if index is not None and manifest.get("content_hash") not in (None, index.content_hash()):
        raise UserError(
            f"{manifest_uri(root, latest)}: the dataset's judgements do not add up to its content hash: a "
            "version's files were edited or replaced"
        )
    return Snapshot(version=latest, ledger=ledger)


def _pointer_exists(root: str, pointer: str) -> bool:
    """Whether the dataset has its pointer, waiting for it while the first version's writer is between its
    manifest and its pointer (a version claimed moments ago): only a pointer missing for longer is damage."""
    deadline = time.monotonic() + POINTER_WAIT_SECONDS
    while not storage.exists(pointer):
        claim = storage.join(version_dir(root, 1), "claim.json")
        fresh = storage.exists(claim) and time.time() - _claim_time(claim) < POINTER_WAIT_SECONDS
        if not fresh or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _claim_time(claim_uri: str) -> float:
    claimed = _read_json(claim_uri).get("time", 0)
    return float(claimed) if isinstance(claimed, int | float) else 0.0


def _base_version(root: str, latest: int) -> int:
    """The newest full copy at or before `latest` (version 1 in this layout, where version 1 is complete)."""
    for version in range(latest, 0, -1):
        if "parent" not in _read_json(manifest_uri(root, version)):
            return version
    return 1


def _merge_judgements(root: str, version: int, manifest: dict[str, Any], index: JudgementIndex) -> None:
    uri = storage.join(version_dir(root, version), "judgements.jsonl")
    found = 0
    with _checked(uri, manifest) as handle:
        try:
            for _, line in storage.file_lines(handle):
                index.merge(_JUDGEMENT.validate_json(line))
                found += 1
        except ValidationError as error:
            raise UserError(f"{uri}: not a judgements file: {error.errors()[0]['msg']}") from None
    expected = manifest.get("new_judgements", manifest.get("judgements"))
    if expected is not None and found != expected:
        raise UserError(f"{uri}: holds {found} judgements, its manifest says {expected}: the file is damaged")


def _ledger(root: str, version: int, manifest: dict[str, Any]) -> list[LedgerEntry]:
    uri = storage.join(version_dir(root, version), "ledger.jsonl")
    with _checked(uri, manifest) as handle:
        try:
            return [LedgerEntry.model_validate_json(line) for _, line in storage.file_lines(handle)]
        except ValidationError as error:
            raise UserError(f"{uri}: not a ledger file: {error.errors()[0]['msg']}") from None


@contextmanager
def _checked(uri: str, manifest: dict[str, Any]) -> Iterator[BinaryIO]:
    """A version's file, its sha256 checked against the manifest (where the manifest records one)."""
    if not storage.exists(uri):
        raise UserError(f"{uri}: missing from its dataset version; restore it")
    with storage.reading(uri) as handle:
        expected = manifest.get("sha256", {}).get(uri.rsplit("/", 1)[-1])
        if expected is not None and hashlib.file_digest(handle, "sha256").hexdigest() != expected:
            raise UserError(f"{uri}: does not match its manifest's sha256: the file was truncated or edited")
        handle.seek(0)
        try:
            yield handle
        except UnicodeDecodeError:
            raise UserError(f"{uri}: not UTF-8 text: the file is damaged") from None


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
    index: JudgementIndex,
    new_entries: list[LedgerEntry],
    summary: dict[str, Any],
    claimant: str,
) -> str:
    """Write version `base.version + 1`: the judgements this run added or changed (marked in `index`, which
    holds the whole dataset) and its ledger entries. Claims the version first (VersionTaken when another
    ingestion has it), moves the pointer last; returns the manifest's location."""
    version = base.version + 1
    folder = version_dir(root, version)
    claim = json.dumps({"claimant": claimant, "time": time.time()}).encode()
    if not storage.create_exclusive(storage.join(folder, "claim.json"), claim):
        _raise_if_abandoned(root, version)
        raise VersionTaken(f"version {version} of {root} was taken by another ingestion")
    with storage.writing_jsonl(storage.join(folder, "judgements.jsonl")) as judgements:
        for line in index.changed_lines():
            judgements.write_line(line)
    with storage.writing_jsonl(storage.join(folder, "ledger.jsonl")) as ledger:
        for entry in new_entries:
            ledger.write(entry.model_dump())
    counts = index.counts()
    manifest = {
        **summary,
        "pair_judgements": counts["pair_judgements"],
        "ratings": counts["ratings"],
        "contains_simulated_labels": counts["simulated"] > 0,
        "format": FORMAT,
        "version": version,
        "parent": base.version,
        "new_judgements": judgements.rows,
        "judgements": counts["pair_judgements"] + counts["ratings"],
        "content_hash": index.content_hash(),
        "sha256": {"judgements.jsonl": judgements.sha256(), "ledger.jsonl": ledger.sha256()},
    }
    written = manifest_uri(root, version)
    storage.write_text(written, json.dumps(manifest, indent=2, sort_keys=True))
    storage.write_json(storage.join(root, "latest.json"), {"version": version})
    return written


def _raise_if_abandoned(root: str, version: int) -> None:
    """A claim whose version never got its manifest, long after: an ingestion died while writing it."""
    if storage.exists(manifest_uri(root, version)):
        return
    age = time.time() - _claim_time(storage.join(version_dir(root, version), "claim.json"))
    if age > STALE_CLAIM_SECONDS:
        raise UserError(
            f"{version_dir(root, version)} was claimed {age:.0f} s ago and never "
            "completed (an ingestion died while writing it): remove that folder and run again"
        )
