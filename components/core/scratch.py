"""A scratch SQLite database for one step: rows of a dataset larger than memory, on local disk, deduplicated,
grouped and sorted by SQLite, removed when the step ends."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_database(schema: str) -> Iterator[sqlite3.Connection]:
    with tempfile.TemporaryDirectory(prefix="rlhf-scratch-") as folder:
        database = sqlite3.connect(Path(folder) / "scratch.sqlite")
        try:
            # Nothing to recover after a crash: no journal, no fsync. Sorts spill to disk beyond the cache;
            # 16 MB of it: 64 MB raised the peak at 1M judgements by 130 MB and ingested no faster.
            database.executescript(
                "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -16384;" + schema
            )
            yield database
        finally:
            database.close()
