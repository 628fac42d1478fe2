"""The working set of one ingestion, on disk: every judgement so far in dataset order, found by identity, and
the annotation tasks that task-choice records name.

A SQLite file in a temporary folder that lives as long as the step, so memory stays flat however large the
dataset grows: a judgement is a row, read back as a model only where a group of them is needed (one prompt's
ratings, one pair's votes). A row's rowid is its place in the dataset: the order it first appeared in, kept
when a later version gives it another source.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from typing import Any, NamedTuple

from rlhf_components.core import storage
from rlhf_components.core.records import AnnotationTask, prompt_key, read_records
from rlhf_components.core.scratch import scratch_database
from rlhf_components.ingest_feedback.formats import Judgement, PairJudgement, RatingJudgement
from rlhf_components.ingest_feedback.quality import PairKey

SCHEMA = """
CREATE TABLE judgements (
    key BLOB NOT NULL UNIQUE,   -- digest of the identity: what one annotator can judge only once
    kind TEXT NOT NULL,         -- pair or rating
    annotator TEXT NOT NULL,
    prompt_key TEXT NOT NULL,
    first TEXT NOT NULL,        -- response_a, or the rated response
    second TEXT NOT NULL,       -- response_b, or ''
    verdict TEXT NOT NULL,      -- the choice, or the rating as JSON
    simulated INTEGER NOT NULL,
    prompt TEXT NOT NULL,       -- JSON
    canonical TEXT NOT NULL,    -- the judgement without its sources, as the content hash dumps it
    sources TEXT NOT NULL,      -- JSON list
    changed INTEGER NOT NULL    -- added or given another source by this run
);
CREATE TABLE votes (
    prompt_key TEXT NOT NULL, first TEXT NOT NULL, second TEXT NOT NULL, seq INTEGER NOT NULL,
    annotator TEXT NOT NULL, choice TEXT NOT NULL, simulated INTEGER NOT NULL, prompt TEXT NOT NULL,
    sources TEXT NOT NULL
);
CREATE TABLE tasks (task_id TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


class Earlier(NamedTuple):
    verdict: str
    first_source: str
    is_rating: bool


@contextmanager
def judgement_index() -> Iterator[JudgementIndex]:
    """An empty index, removed when the block ends."""
    with scratch_database(SCHEMA) as database:
        yield JudgementIndex(database)


class JudgementIndex:
    def __init__(self, database: sqlite3.Connection) -> None:
        self._db = database
        self._tasks_from: str | None = None
        self._tasks_loaded = False
        self._last_vote = 0

    def clear(self) -> None:
        self._db.execute("DELETE FROM judgements")
        self._db.execute("DELETE FROM votes")

    # ------------------------------------------------------------------------- judgements

    def merge(self, judgement: Judgement, *, changed: bool = False) -> None:
        """A judgement of a dataset version: a new one goes last, a known one is replaced in its place."""
        self._db.execute(
            "INSERT INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET verdict = excluded.verdict, simulated = excluded.simulated, "
            "canonical = excluded.canonical, sources = excluded.sources, changed = excluded.changed",
            _row(judgement, changed),
        )

    def earlier(self, judgement: Judgement) -> Earlier | None:
        found = self._db.execute(
            "SELECT verdict, json_extract(sources, '$[0]'), kind FROM judgements WHERE key = ?",
            (_key(judgement),),
        ).fetchone()
        return None if found is None else Earlier(found[0], found[1], found[2] == "rating")

    def add_source(self, judgement: Judgement, source: str) -> None:
        self._db.execute(
            "UPDATE judgements SET sources = json_insert(sources, '$[#]', ?), changed = 1 WHERE key = ?",
            (source, _key(judgement)),
        )

    def changed_lines(self) -> Iterator[str]:
        """The judgements this run added or gave another source, in dataset order, as JSONL lines."""
        for canonical, sources in self._db.execute(
            "SELECT canonical, sources FROM judgements WHERE changed ORDER BY rowid"
        ):
            yield storage.jsonl_line({**json.loads(canonical), "sources": json.loads(sources)})

    def content_hash(self) -> str:
        digest = storage.ContentHash()
        for (canonical,) in self._db.execute("SELECT canonical FROM judgements ORDER BY rowid"):
            digest.add_json(canonical)
        return digest.hexdigest()

    def counts(self) -> dict[str, int]:
        pairs, ratings, simulated = self._db.execute(
            "SELECT count(*) FILTER (WHERE kind = 'pair'), count(*) FILTER (WHERE kind = 'rating'), "
            "count(*) FILTER (WHERE simulated) FROM judgements"
        ).fetchone()
        return {"pair_judgements": pairs, "ratings": ratings, "simulated": simulated}

    def judgements(self) -> Iterator[Judgement]:
        """Every judgement, in dataset order (for inspection and tests: the step itself reads groups)."""
        for kind, canonical, sources in self._db.execute(
            "SELECT kind, canonical, sources FROM judgements ORDER BY rowid"
        ):
            model = PairJudgement if kind == "pair" else RatingJudgement
            yield model.model_validate({**json.loads(canonical), "sources": json.loads(sources)})

    # ------------------------------------------------------------------------- votes

    def rating_scales(self) -> Iterator[list[RatingJudgement]]:
        """Each annotator's ratings of one prompt's answers, the groups in the order they first appear."""
        rows = self._db.execute(
            "SELECT canonical, sources, min(rowid) OVER (PARTITION BY prompt_key, annotator) AS first_seen "
            "FROM judgements WHERE kind = 'rating' ORDER BY first_seen, rowid"
        )
        for _, group in groupby(rows, key=lambda row: row[2]):
            yield [
                RatingJudgement.model_validate({**json.loads(canonical), "sources": json.loads(sources)})
                for canonical, sources, _ in group
            ]

    def start_votes(self) -> None:
        """Every pair judgement is a vote; `add_votes` appends the pairs made from ratings after them."""
        self._db.execute("DELETE FROM votes")
        self._db.execute(
            "INSERT INTO votes SELECT prompt_key, first, second, rowid, annotator, verdict, simulated, "
            "prompt, sources FROM judgements WHERE kind = 'pair'"
        )
        self._last_vote = int(
            self._db.execute("SELECT coalesce(max(rowid), 0) FROM judgements").fetchone()[0]
        )

    def add_votes(self, votes: list[PairJudgement]) -> None:
        rows = []
        for vote in votes:
            self._last_vote += 1
            prompt = json.dumps(_plain(vote)["prompt"], ensure_ascii=False)
            sources = json.dumps(vote.sources, ensure_ascii=False)
            rows.append(
                (
                    *_pair_columns(vote),
                    self._last_vote,
                    vote.annotator,
                    vote.choice,
                    vote.simulated,
                    prompt,
                    sources,
                )
            )
        self._db.executemany("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def vote_groups(self) -> Iterator[tuple[PairKey, list[PairJudgement]]]:
        """The votes on each pair (one prompt, the same two answers): pairs in sorted order, votes in the
        order they were cast. A vote's prompt is as stored (text, or messages as dicts): only the pair's
        decision reads it, and validates it there."""
        rows = self._db.execute(
            "SELECT prompt_key, first, second, annotator, choice, simulated, prompt, sources FROM votes "
            "ORDER BY prompt_key, first, second, seq"
        )
        for key, group in groupby(rows, key=lambda row: row[:3]):
            yield (
                key,
                [
                    PairJudgement.model_construct(
                        prompt=json.loads(prompt),
                        response_a=first,
                        response_b=second,
                        choice=choice,
                        annotator=annotator,
                        simulated=bool(simulated),
                        sources=json.loads(sources),
                    )
                    for _, first, second, annotator, choice, simulated, prompt, sources in group
                ],
            )

    # ------------------------------------------------------------------------- tasks

    def tasks_from(self, inbox: str) -> None:
        """Where `get_task` finds tasks: `<inbox>/tasks/*.jsonl`, read at the first lookup."""
        self._tasks_from, self._tasks_loaded = inbox, False

    def get(self, task_id: str) -> AnnotationTask | None:
        """The task `task_id` (a later task file's wins), or None."""
        if not self._tasks_loaded and self._tasks_from is not None:
            for uri in storage.list_files(storage.join(self._tasks_from, "tasks")):
                if uri.endswith(".jsonl"):
                    self._db.executemany(
                        "INSERT OR REPLACE INTO tasks VALUES (?, ?)",
                        (
                            (task.task_id, task.model_dump_json())
                            for task in read_records(uri, AnnotationTask)
                        ),
                    )
            self._tasks_loaded = True
        found = self._db.execute("SELECT body FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return None if found is None else AnnotationTask.model_validate_json(found[0])


def _plain(judgement: Judgement) -> dict[str, Any]:
    return judgement.model_dump(mode="json")


def _pair_columns(judgement: Judgement) -> tuple[str, str, str]:
    if isinstance(judgement, PairJudgement):
        return prompt_key(judgement.prompt), judgement.response_a, judgement.response_b
    return prompt_key(judgement.prompt), judgement.response, ""


def verdict(judgement: Judgement) -> str:
    """What an annotator said: the choice, or the rating as JSON."""
    return judgement.choice if isinstance(judgement, PairJudgement) else json.dumps(judgement.rating)


def _key(judgement: Judgement) -> bytes:
    """What one annotator can judge only once: a pair of answers to a prompt, or one answer's rating."""
    key_prompt, first, second = _pair_columns(judgement)
    identity = [judgement.kind, judgement.annotator, key_prompt, first, second]
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).digest()[:16]


def _row(judgement: Judgement, changed: bool) -> tuple[Any, ...]:
    plain = _plain(judgement)
    sources = plain.pop("sources")
    return (
        _key(judgement),
        judgement.kind,
        judgement.annotator,
        *_pair_columns(judgement),
        verdict(judgement),
        judgement.simulated,
        json.dumps(plain["prompt"], ensure_ascii=False),
        json.dumps(plain, sort_keys=True, ensure_ascii=False),
        json.dumps(sources, ensure_ascii=False),
        changed,
    )
