"""Fold new feedback files into the cumulative preference dataset, once each, and write training pairs.

1. The simulated annotator (demos and tests only) labels this run's tasks into the inbox.
2. Every feedback file under `<inbox>/labels/` and `sources` is hashed. When the ledger has seen them all, the
   step reads no judgement: the pairs made from the latest version before are its outputs (6).
3. Otherwise the dataset is loaded into a JudgementIndex (index.py: SQLite on local disk, so memory stays
   flat however large the dataset grows), and every new file is read a record at a time (formats.py lists
   the shapes). Each record becomes judgements or goes to the quarantine with a reason code and its
   location. A judgement an annotator already made is merged (its location added); one that contradicts
   that annotator's earlier judgement of the same pair or answer is quarantined.
4. When more than `max_invalid_fraction` of the new records are invalid, the step fails, naming the worst
   files, and writes no dataset version: fix the files and run again, nothing is lost.
5. Otherwise the new judgements and ledger entries become the next dataset version (store.py). Two
   ingestions at once cannot share a version: the loser reads the winner's version and tries the next one,
   so both runs' judgements end in the dataset.
6. Training pairs are the majority votes over every judgement so far (quality.py), split train/eval by a
   hash of the pair and kept beside the version they come from (pairs.py); agreement and per-annotator
   statistics go to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_dict, log_metrics, step_run
from rlhf_components.ingest_feedback import pairs, simulated, store
from rlhf_components.ingest_feedback.config import Config, Inputs, Outputs
from rlhf_components.ingest_feedback.formats import (
    Invalid,
    Judgement,
    Limits,
    judgements,
    list_sources,
    records,
)
from rlhf_components.ingest_feedback.index import JudgementIndex, judgement_index, verdict

log = logging.getLogger(__name__)

SAVE_ATTEMPTS = 6


class Ingestion:
    """What this run added to the index, or refused into the quarantine, and the counts of both."""

    def __init__(self, index: JudgementIndex, quarantine: storage.JsonlFile) -> None:
        self.index = index
        self.quarantine = quarantine
        self.counts: Counter[str] = Counter(
            dict.fromkeys(
                ("read", "accepted", "quarantined", "duplicates", "files_ingested", "files_already_ingested"),
                0,
            )
        )
        self.reasons: Counter[str] = Counter()
        self.invalid_by_source: Counter[str] = Counter()

    def read(self, uri: str, limits: Limits) -> None:
        """Every record of one file, a record at a time."""
        with storage.reading(uri) as handle:
            for location, raw in records(uri, handle):
                self.counts["read"] += 1
                if isinstance(raw, Invalid):
                    self.refuse(uri, location, raw, raw)
                    continue
                try:
                    found, capped = judgements(raw, location, self.index, limits)
                except Invalid as invalid:
                    self.refuse(uri, location, raw, invalid)
                    continue
                self.counts["ranking_pairs_capped"] += capped
                self.add(uri, location, raw, found)

    def add(self, uri: str, location: str, raw: object, found: list[Judgement]) -> None:
        """Merge a record's judgements, or quarantine the whole record if any contradicts an earlier one.
        (A record's judgements are of distinct pairs or answers: a ranking may not list an answer twice.)"""
        earlier = [self.index.earlier(judgement) for judgement in found]
        for judgement, before in zip(found, earlier, strict=True):
            if before is not None and before.verdict != verdict(judgement):
                what = "judgement of this pair"
                if before.is_rating:
                    what = f"rating {before.verdict} of this answer"
                self.refuse(
                    uri,
                    location,
                    raw,
                    Invalid(
                        "conflicting_duplicate",
                        f"contradicts {judgement.annotator}'s earlier {what} at {before.first_source}",
                    ),
                )
                return
        for judgement, before in zip(found, earlier, strict=True):
            if before is None:
                self.index.merge(judgement, changed=True)
            else:
                self.index.add_source(judgement, location)
                self.counts["duplicates"] += 1
        self.counts["accepted"] += 1

    def refuse(self, uri: str, location: str, raw: object, invalid: Invalid) -> None:
        self.quarantine.write(
            {
                "location": location,
                "code": invalid.code,
                "reason": str(invalid),
                "record": raw.text if isinstance(raw, Invalid) else json.dumps(raw, default=str),
            }
        )
        self.counts["quarantined"] += 1
        self.reasons[invalid.code] += 1
        self.invalid_by_source[uri] += 1


def _file_hash(uri: str) -> str:
    with storage.reading(uri) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_new_files(
    snapshot: store.Snapshot, hashes: dict[str, str], ingestion: Ingestion, limits: Limits
) -> list[store.LedgerEntry]:
    """Every record of every file the ledger has not seen, merged into the index; their ledger entries."""
    seen = snapshot.ingested()
    new_entries: list[store.LedgerEntry] = []
    for uri, content_hash in hashes.items():
        if content_hash in seen:
            ingestion.counts["files_already_ingested"] += 1
            continue
        seen.add(content_hash)
        before = Counter(ingestion.counts)
        ingestion.read(uri, limits)
        new_entries.append(
            store.LedgerEntry(
                content_hash=content_hash,
                uri=uri,
                records=ingestion.counts["read"] - before["read"],
                accepted=ingestion.counts["accepted"] - before["accepted"],
                quarantined=ingestion.counts["quarantined"] - before["quarantined"],
                version=snapshot.version + 1,
            )
        )
        ingestion.counts["files_ingested"] += 1
    return new_entries


def _refuse_too_many_invalid(ingestion: Ingestion, config: Config, quarantine_uri: str) -> None:
    """The quarantine is written and counted; too many invalid records stop the run before any version."""
    counts = ingestion.counts
    invalid_fraction = counts["quarantined"] / max(1, counts["read"])
    log_metrics(
        dict(counts)
        | {f"invalid_{code}": n for code, n in ingestion.reasons.items()}
        | {"invalid_fraction": invalid_fraction}
    )
    if invalid_fraction > config.max_invalid_fraction:
        worst = ", ".join(f"{uri} ({n})" for uri, n in ingestion.invalid_by_source.most_common(3))
        raise UserError(
            f"ingest_feedback: {invalid_fraction:.1%} of {counts['read']} new records are invalid "
            f"(limit {config.max_invalid_fraction:.1%}); worst sources: {worst}; reasons in "
            f"{quarantine_uri}; no dataset version was written"
        )


def _fold_in(
    root: str, sources: list[str], index: JudgementIndex, config: Config, context: RunContext
) -> tuple[store.Snapshot, Ingestion, bool]:
    """(the dataset version this run ends on, what it read, whether `index` holds that version's judgements).
    The dataset is read only when there are files it has not seen. A version another ingestion took first
    is read back, and this run's files are folded into the next one."""
    limits = Limits((config.rating_min, config.rating_max), config.max_pairs_per_ranking)
    quarantine_uri = step_output(context, "ingest_feedback", "quarantine.jsonl")
    hashes = {uri: _file_hash(uri) for uri in sources}
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        snapshot = store.head(root)
        loaded = not set(hashes.values()) <= snapshot.ingested()
        if loaded:
            index.clear()
            snapshot = store.load(root, index)
        with storage.writing_jsonl(quarantine_uri) as quarantine:
            ingestion = Ingestion(index, quarantine)
            new_entries = _read_new_files(snapshot, hashes, ingestion, limits)
        _refuse_too_many_invalid(ingestion, config, quarantine_uri)
        if not new_entries:
            return snapshot, ingestion, loaded
        summary = {
            "files": len(snapshot.ledger) + len(new_entries),
            "new_files": [entry.uri for entry in new_entries],
        }
        try:
            store.save(root, snapshot, index, new_entries, summary, context.parent_run_id)
        except store.VersionTaken as taken:
            log.warning(
                "ingest_feedback: %s; reading it and trying again (%d/%d)", taken, attempt, SAVE_ATTEMPTS
            )
            time.sleep(min(2.0**attempt, 30.0) * random.uniform(0.5, 1.0))
            continue
        return store.Snapshot(version=snapshot.version + 1, ledger=[]), ingestion, True
    raise UserError(
        f"ingest_feedback: other ingestions took {SAVE_ATTEMPTS} dataset versions of {root} in a row while "
        "this one was writing; nothing of this run was written: run it again"
    )


def _training_pairs(
    root: str, version: int, loaded: bool, index: JudgementIndex, config: Config
) -> pairs.PairSet:
    """The version's pairs: made before with these settings, or made now."""
    settings = pairs.PairSettings(
        rating_min_difference=config.rating_min_difference,
        max_rating_pairs=config.max_rating_pairs,
        tie_policy=config.tie_policy,
        eval_fraction=config.eval_fraction,
    )
    found = pairs.made(root, version, settings)
    if found is not None:
        return found
    if not loaded:
        index.clear()
        version = store.load(root, index).version
    return pairs.make(root, version, settings, index)


def run(config: Config, inputs: Inputs, context: RunContext) -> Outputs:
    with step_run(context, "ingest_feedback", config) as mlflow_run:
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
        sources, skipped = list_sources([labels_dir, *config.sources])
        if skipped:
            log.warning(
                "ingest_feedback: skipped %d files that are no feedback format: %s",
                len(skipped),
                ", ".join(skipped[:5]),
            )
            log_dict(skipped, "skipped_files.json")
        root = config.dataset or storage.join(inputs.inbox, "dataset")
        with judgement_index() as index:
            index.tasks_from(inputs.inbox)
            snapshot, ingestion, loaded = _fold_in(root, sources, index, config, context)
            if snapshot.version == 0:
                raise UserError(f"ingest_feedback: no feedback in {labels_dir} yet: no preference pairs")
            made = _training_pairs(root, snapshot.version, loaded, index, config)
        counts = ingestion.counts | made.counts | {"files_skipped": len(skipped)}
        if counts["pairs"] < 2:
            raise UserError(
                f"ingest_feedback: only {counts['pairs']} usable preference pairs in dataset version "
                f"{snapshot.version} ({labels_dir})"
            )
        outputs = Outputs(
            train=made.train,
            eval=made.eval,
            quarantine=step_output(context, "ingest_feedback", "quarantine.jsonl"),
            manifest=step_output(context, "ingest_feedback", "manifest.json"),
            content_hash=made.content_hash,
            counts=dict(counts),
            dataset_version=snapshot.version,
            dataset_manifest=store.manifest_uri(root, snapshot.version),
        )
        agreement = made.agreement
        storage.write_json(
            outputs.manifest,
            {
                "row_count": counts["pairs"],
                "content_hash": made.content_hash,
                "dataset_version": snapshot.version,
                "dataset_content_hash": made.dataset_content_hash,
                "counts": dict(counts),
                "invalid_reasons": dict(ingestion.reasons),
                "agreement": agreement.model_dump(),
                "contains_simulated_labels": counts["simulated"] > 0,
            },
        )
        agreement_metrics = {
            "shared_pairs": agreement.shared_pairs,
            "raw_agreement": agreement.raw_agreement,
            "krippendorff_alpha": agreement.krippendorff_alpha,
        }
        log_metrics(
            {k: v for k, v in agreement_metrics.items() if v is not None}
            | {
                "pairs": counts["pairs"],
                "simulated_pairs": counts["simulated"],
                "dataset_version": snapshot.version,
                "annotators": len(agreement.annotators),
                "files_skipped": len(skipped),
            }
        )
        if mlflow_run is not None:
            import mlflow

            mlflow.log_dict(
                {name: stats.model_dump() for name, stats in agreement.annotators.items()},
                "feedback/annotators.json",
            )
        log.info("ingest_feedback: %s", dict(counts))
        return outputs
