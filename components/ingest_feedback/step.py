"""Fold new feedback files into the cumulative preference dataset, once each, and write training pairs.

1. The simulated annotator (demos and tests only) labels this run's tasks into the inbox.
2. Every feedback file under `<inbox>/labels/` and `sources` whose content hash the ledger has not seen is
   read (formats.py lists the shapes). Each record becomes judgements or goes to the quarantine with a reason
   code and its location. A judgement an annotator already made is merged (its location added); one that
   contradicts that annotator's earlier judgement of the same pair or answer is quarantined.
3. When more than `max_invalid_fraction` of the new records are invalid, the step fails, naming the worst
   files, and writes no dataset version: fix the files and run again, nothing is lost.
4. Otherwise the new judgements and ledger entries become the next dataset version (store.py). Two
   ingestions at once cannot share a version: the loser reads the winner's version and tries the next one,
   so both runs' judgements end in the dataset.
5. Training pairs are the majority votes over every judgement so far (quality.py), split train/eval by a
   hash of the pair; agreement and per-annotator statistics go to MLflow.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import AnnotationTask, read_records
from rlhf_components.core.splits import is_eval
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_dict, log_metrics, step_run
from rlhf_components.ingest_feedback import quality, simulated, store
from rlhf_components.ingest_feedback.config import Config, Inputs, Outputs
from rlhf_components.ingest_feedback.formats import (
    Invalid,
    Judgement,
    Limits,
    PairJudgement,
    RatingJudgement,
    identity,
    judgements,
    list_sources,
    records,
)

log = logging.getLogger(__name__)

SAVE_ATTEMPTS = 6


def _load_tasks(inbox: str) -> dict[str, AnnotationTask]:
    tasks: dict[str, AnnotationTask] = {}
    for uri in storage.list_files(storage.join(inbox, "tasks")):
        if uri.endswith(".jsonl"):
            tasks.update((task.task_id, task) for task in read_records(uri, AnnotationTask))
    return tasks


def _verdict(judgement: Judgement) -> str | float:
    return judgement.choice if isinstance(judgement, PairJudgement) else judgement.rating


class Ingestion:
    """The judgements so far, indexed by identity, and what this run added or refused."""

    def __init__(self, existing: list[Judgement]) -> None:
        self.judgements: dict[tuple[str, ...], Judgement] = {identity(j): j for j in existing}
        self.changed: set[tuple[str, ...]] = set()
        """the judgements this run added, or gave another source: what the next version holds"""
        self.quarantine: list[dict[str, str]] = []
        self.counts: Counter[str] = Counter(
            dict.fromkeys(
                ("read", "accepted", "quarantined", "duplicates", "files_ingested", "files_already_ingested"),
                0,
            )
        )
        self.reasons: Counter[str] = Counter()
        self.invalid_by_source: Counter[str] = Counter()

    def add(self, uri: str, location: str, raw: object, found: list[Judgement]) -> None:
        """Merge a record's judgements, or quarantine the whole record if any contradicts an earlier one."""
        for judgement in found:
            earlier = self.judgements.get(identity(judgement))
            if earlier is not None and _verdict(earlier) != _verdict(judgement):
                self.refuse(
                    uri,
                    location,
                    raw,
                    Invalid(
                        "conflicting_duplicate",
                        f"contradicts {judgement.annotator}'s earlier "
                        + (
                            f"rating {earlier.rating} of this answer"
                            if isinstance(earlier, RatingJudgement)
                            else "judgement of this pair"
                        )
                        + f" at {earlier.sources[0]}",
                    ),
                )
                return
        for judgement in found:
            key = identity(judgement)
            earlier = self.judgements.get(key)
            if earlier is None:
                self.judgements[key] = judgement
            else:
                earlier.sources.append(location)
                self.counts["duplicates"] += 1
            self.changed.add(key)
        self.counts["accepted"] += 1

    def refuse(self, uri: str, location: str, raw: object, invalid: Invalid) -> None:
        self.quarantine.append(
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


def _read_new_files(
    snapshot: store.Snapshot, sources: list[str], tasks: dict[str, AnnotationTask], limits: Limits
) -> tuple[Ingestion, list[store.LedgerEntry]]:
    """Every record of every file the ledger has not seen, merged into the snapshot's judgements."""
    ingestion = Ingestion(snapshot.judgements)
    seen = snapshot.ingested()
    new_entries: list[store.LedgerEntry] = []
    for uri in sources:
        data = storage.read_bytes(uri)
        content_hash = storage.sha256_hex(data)
        if content_hash in seen:
            ingestion.counts["files_already_ingested"] += 1
            continue
        seen.add(content_hash)
        before = Counter(ingestion.counts)
        for location, raw in records(uri, data):
            ingestion.counts["read"] += 1
            if isinstance(raw, Invalid):
                ingestion.refuse(uri, location, raw, raw)
                continue
            try:
                found, capped = judgements(raw, location, tasks, limits)
            except Invalid as invalid:
                ingestion.refuse(uri, location, raw, invalid)
                continue
            ingestion.counts["ranking_pairs_capped"] += capped
            ingestion.add(uri, location, raw, found)
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
    return ingestion, new_entries


def _refuse_too_many_invalid(ingestion: Ingestion, config: Config, quarantine_uri: str) -> None:
    """The quarantine is written and counted; too many invalid records stop the run before any version."""
    counts = ingestion.counts
    storage.write_jsonl(quarantine_uri, ingestion.quarantine)
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
    root: str, sources: list[str], tasks: dict[str, AnnotationTask], config: Config, context: RunContext
) -> tuple[store.Snapshot, Ingestion, str]:
    """(the dataset version this run ends on, what it read, that version's manifest). A version another
    ingestion took first is read back, and this run's files are folded into the next one."""
    limits = Limits((config.rating_min, config.rating_max), config.max_pairs_per_ranking)
    quarantine_uri = step_output(context, "ingest_feedback", "quarantine.jsonl")
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        snapshot = store.load(root)
        ingestion, new_entries = _read_new_files(snapshot, sources, tasks, limits)
        _refuse_too_many_invalid(ingestion, config, quarantine_uri)
        merged = list(ingestion.judgements.values())
        if not new_entries:
            return snapshot, ingestion, store.manifest_uri(root, snapshot.version)
        # In the dataset's order: loading merges versions back into exactly this order, which the content
        # hash covers.
        changed = [j for key, j in ingestion.judgements.items() if key in ingestion.changed]
        summary = {
            "pair_judgements": sum(isinstance(j, PairJudgement) for j in merged),
            "ratings": sum(isinstance(j, RatingJudgement) for j in merged),
            "files": len(snapshot.ledger) + len(new_entries),
            "new_files": [entry.uri for entry in new_entries],
            "contains_simulated_labels": any(j.simulated for j in merged),
        }
        try:
            manifest = store.save(
                root, snapshot, changed, new_entries, merged, summary, context.parent_run_id
            )
        except store.VersionTaken as taken:
            log.warning(
                "ingest_feedback: %s; reading it and trying again (%d/%d)", taken, attempt, SAVE_ATTEMPTS
            )
            time.sleep(min(2.0**attempt, 30.0) * random.uniform(0.5, 1.0))
            continue
        version = store.Snapshot(version=snapshot.version + 1, judgements=merged, ledger=[])
        return version, ingestion, manifest
    raise UserError(
        f"ingest_feedback: other ingestions took {SAVE_ATTEMPTS} dataset versions of {root} in a row while "
        "this one was writing; nothing of this run was written: run it again"
    )


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
        snapshot, ingestion, dataset_manifest = _fold_in(
            root, sources, _load_tasks(inputs.inbox), config, context
        )
        ingestion.counts["files_skipped"] = len(skipped)
        all_judgements = snapshot.judgements
        pair_judgements = [j for j in all_judgements if isinstance(j, PairJudgement)]
        ratings = [j for j in all_judgements if isinstance(j, RatingJudgement)]
        rating_pairs, rating_pairs_capped = quality.pairs_from_ratings(
            ratings, config.rating_min_difference, config.max_rating_pairs
        )
        votes = pair_judgements + rating_pairs
        pairs, dropped_ties = quality.preferences(votes, config.tie_policy)
        agreement = quality.agreement(votes)
        if len(pairs) < 2:
            raise UserError(
                f"ingest_feedback: only {len(pairs)} usable preference pairs in dataset version "
                f"{snapshot.version} ({labels_dir})"
            )
        counts = ingestion.counts
        train = [p.model_dump() for p in pairs if not is_eval(p.id, config.eval_fraction)]
        evaluation = [p.model_dump() for p in pairs if is_eval(p.id, config.eval_fraction)]
        counts.update(
            judgements=len(all_judgements),
            pairs=len(pairs),
            ties_dropped=dropped_ties,
            train=len(train),
            eval=len(evaluation),
            simulated=sum(p.simulated for p in pairs),
            rating_pairs_capped=rating_pairs_capped,
        )
        pairs_hash = storage.content_hash([p.model_dump(exclude={"sources"}) for p in pairs])
        outputs = Outputs(
            train=step_output(context, "ingest_feedback", "train.jsonl"),
            eval=step_output(context, "ingest_feedback", "eval.jsonl"),
            quarantine=step_output(context, "ingest_feedback", "quarantine.jsonl"),
            manifest=step_output(context, "ingest_feedback", "manifest.json"),
            content_hash=pairs_hash,
            counts=dict(counts),
            dataset_version=snapshot.version,
            dataset_manifest=dataset_manifest,
        )
        storage.write_jsonl(outputs.train, train)
        storage.write_jsonl(outputs.eval, evaluation)
        storage.write_json(
            outputs.manifest,
            {
                "row_count": len(pairs),
                "content_hash": pairs_hash,
                "dataset_version": snapshot.version,
                "dataset_content_hash": store.content_hash(all_judgements),
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
                "pairs": len(pairs),
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
