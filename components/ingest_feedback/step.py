"""Fold new feedback files into the cumulative preference dataset, once each, and write training pairs.

1. The simulated annotator (demos and tests only) labels this run's tasks into the inbox.
2. Every feedback file under `<inbox>/labels/` and `sources` whose content hash the ledger has not seen is
   read (formats.py lists the shapes). Each record becomes judgements or goes to the quarantine with a reason
   code and its location. A judgement an annotator already made is merged (its location added); one that
   contradicts that annotator's earlier judgement of the same pair or answer is quarantined.
3. When more than `max_invalid_fraction` of the new records are invalid, the step fails, naming the worst
   files, and writes no dataset version: fix the files and run again, nothing is lost.
4. Otherwise the new judgements and ledger entries become the next dataset version (store.py).
5. Training pairs are the majority votes over every judgement so far (quality.py), split train/eval by a
   hash of the pair; agreement and per-annotator statistics go to MLflow.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.records import AnnotationTask, prompt_key, read_records
from rlhf_components.core.splits import is_eval
from rlhf_components.core.step import step_output
from rlhf_components.core.tracking import RunContext, log_metrics, step_run
from rlhf_components.ingest_feedback import quality, simulated, store
from rlhf_components.ingest_feedback.config import Config, Inputs, Outputs
from rlhf_components.ingest_feedback.formats import (
    Invalid,
    Judgement,
    PairJudgement,
    RatingJudgement,
    judgements,
    list_sources,
    records,
)

log = logging.getLogger(__name__)


def _load_tasks(inbox: str) -> dict[str, AnnotationTask]:
    tasks: dict[str, AnnotationTask] = {}
    for uri in storage.list_files(storage.join(inbox, "tasks")):
        if uri.endswith(".jsonl"):
            tasks.update((task.task_id, task) for task in read_records(uri, AnnotationTask))
    return tasks


def _identity(judgement: Judgement) -> tuple[str, ...]:
    """What one annotator can judge only once: a pair of answers, or one answer's rating."""
    if isinstance(judgement, PairJudgement):
        return (
            "pair",
            judgement.annotator,
            prompt_key(judgement.prompt),
            judgement.response_a,
            judgement.response_b,
        )
    return "rating", judgement.annotator, prompt_key(judgement.prompt), judgement.response


def _verdict(judgement: Judgement) -> str | float:
    return judgement.choice if isinstance(judgement, PairJudgement) else judgement.rating


class Ingestion:
    """The judgements so far, indexed by identity, and what this run added or refused."""

    def __init__(self, existing: list[Judgement]) -> None:
        self.judgements: dict[tuple[str, ...], Judgement] = {_identity(j): j for j in existing}
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
            earlier = self.judgements.get(_identity(judgement))
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
            earlier = self.judgements.get(_identity(judgement))
            if earlier is None:
                self.judgements[_identity(judgement)] = judgement
            else:
                earlier.sources.append(location)
                self.counts["duplicates"] += 1
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
        tasks = _load_tasks(inputs.inbox)
        dataset_root = config.dataset or storage.join(inputs.inbox, "dataset")
        snapshot = store.load(dataset_root)
        ingestion = Ingestion(snapshot.judgements)
        seen = snapshot.ingested()
        new_entries: list[store.LedgerEntry] = []
        for uri in list_sources([labels_dir, *config.sources]):
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
                    found = judgements(raw, location, tasks, (config.rating_min, config.rating_max))
                except Invalid as invalid:
                    ingestion.refuse(uri, location, raw, invalid)
                    continue
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

        counts = ingestion.counts
        quarantine_uri = step_output(context, "ingest_feedback", "quarantine.jsonl")
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

        all_judgements = list(ingestion.judgements.values())
        pair_judgements = [j for j in all_judgements if isinstance(j, PairJudgement)]
        ratings = [j for j in all_judgements if isinstance(j, RatingJudgement)]
        votes = pair_judgements + quality.pairs_from_ratings(ratings, config.rating_min_difference)
        pairs, dropped_ties = quality.preferences(votes, config.tie_policy)
        agreement = quality.agreement(votes)
        dataset_hash = storage.content_hash(
            [j.model_dump(mode="json", exclude={"sources"}) for j in all_judgements]
        )
        if new_entries:
            snapshot = store.Snapshot(
                version=snapshot.version + 1,
                judgements=all_judgements,
                ledger=[*snapshot.ledger, *new_entries],
            )
            dataset_manifest = store.save(
                dataset_root,
                snapshot,
                {
                    "version": snapshot.version,
                    "content_hash": dataset_hash,
                    "judgements": len(all_judgements),
                    "pair_judgements": len(pair_judgements),
                    "ratings": len(ratings),
                    "files": len(snapshot.ledger),
                    "new_files": [entry.uri for entry in new_entries],
                    "contains_simulated_labels": any(j.simulated for j in all_judgements),
                },
            )
        else:
            dataset_manifest = store.manifest_uri(dataset_root, snapshot.version)
        if len(pairs) < 2:
            raise UserError(
                f"ingest_feedback: only {len(pairs)} usable preference pairs in dataset version "
                f"{snapshot.version} ({labels_dir})"
            )

        train = [p.model_dump() for p in pairs if not is_eval(p.id, config.eval_fraction)]
        evaluation = [p.model_dump() for p in pairs if is_eval(p.id, config.eval_fraction)]
        counts.update(
            judgements=len(all_judgements),
            pairs=len(pairs),
            ties_dropped=dropped_ties,
            train=len(train),
            eval=len(evaluation),
            simulated=sum(p.simulated for p in pairs),
        )
        pairs_hash = storage.content_hash([p.model_dump(exclude={"sources"}) for p in pairs])
        outputs = Outputs(
            train=step_output(context, "ingest_feedback", "train.jsonl"),
            eval=step_output(context, "ingest_feedback", "eval.jsonl"),
            quarantine=quarantine_uri,
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
                "dataset_content_hash": dataset_hash,
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
