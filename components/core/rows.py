"""Rows of user files (prompt sources, feedback) read so that nothing a file holds can crash a step.

`read_rows` yields (location, row) for JSONL (also `.ndjson`), CSV and Parquet files, by name in any case and
through one `.gz`. A row that cannot be read at all — invalid UTF-8 or JSON, JSON nested too deep, an integer
over Python's digit limit, a CSV field over the csv module's limit, a file that is no Parquet or gzip — comes
as an `Invalid` in its place, with a reason code, so the step can quarantine it and go on with the next.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from typing import Any

from rlhf_components.core.storage import jsonl_lines

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".json": "json"}
BOM = b"\xef\xbb\xbf"


class Invalid(ValueError):
    """A record we cannot use: `code` is the reason counted in MLflow, the message says what is wrong."""

    def __init__(self, code: str, message: str, text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.text = text
        """the record as it was read, where it could not be parsed at all"""


def file_kind(uri: str) -> str | None:
    """jsonl, csv, parquet or json by the file's name, whatever its case, through one `.gz`; else None."""
    name = uri.rsplit("/", 1)[-1].lower().removesuffix(".gz")
    return next((kind for suffix, kind in KINDS.items() if name.endswith(suffix)), None)


def unpacked(uri: str, data: bytes) -> bytes | Invalid:
    """A file's bytes, decompressed when its name ends with `.gz`."""
    if not uri.lower().endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:
        return Invalid("unreadable_file", f"not a readable gzip file: {error}")


def read_rows(uri: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """(location, row or Invalid) for every row of a JSONL, CSV or Parquet file (see the module's text).
    CSV cells are strings, as written."""
    data_or_invalid = unpacked(uri, data)
    if isinstance(data_or_invalid, Invalid):
        yield uri, data_or_invalid
        return
    kind = file_kind(uri)
    if kind == "jsonl":
        yield from _jsonl(uri, data_or_invalid)
    elif kind == "csv":
        yield from _csv(uri, data_or_invalid)
    elif kind == "parquet":
        yield from _parquet(uri, data_or_invalid)


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or an Invalid that says why not."""
    try:
        return json.loads(text)
    except RecursionError:
        return Invalid("too_deep", "JSON nested deeper than the parser allows", text[:10_000])
    except ValueError as error:  # JSONDecodeError, and integers over Python's digit limit
        message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        return Invalid("invalid_json", f"invalid JSON: {message}", text[:10_000])


def decoded(uri: str, data: bytes) -> str | Invalid:
    """A whole file as UTF-8 text, without a byte-order mark."""
    try:
        return data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as error:
        return Invalid("invalid_utf8", f"{uri} is not UTF-8 text ({error.reason} at byte {error.start})")


def _jsonl(uri: str, data: bytes) -> Iterator[tuple[str, Any]]:
    # Decoded line by line, so one line of bad bytes is one bad record; lines end at "\n" only.
    for number, raw in enumerate(data.removeprefix(BOM).split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            shown = raw.decode("utf-8", "replace")
            yield f"{uri}:{number}", Invalid("invalid_utf8", f"not UTF-8 text: {error.reason}", shown)
            continue
        for _, line in jsonl_lines(text):
            yield f"{uri}:{number}", parse_json(line)


def _csv(uri: str, data: bytes) -> Iterator[tuple[str, Any]]:
    text = decoded(uri, data)
    if isinstance(text, Invalid):
        yield uri, text
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # a field over the csv module's limit, a NUL byte, …
            # The reader stops inside the row it cannot read, before counting its line.
            yield f"{uri}:{reader.line_num + 1}", Invalid("bad_csv_row", f"unreadable CSV row: {error}")
            continue
        location = f"{uri}:{reader.line_num}"  # the file's line, blank lines counted
        if None in row:
            yield location, Invalid("bad_csv_row", "more values than columns", json.dumps(row, default=str))
        else:
            yield location, row


def _parquet(uri: str, data: bytes) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as error:
        yield uri, Invalid("unreadable_file", f"not a readable Parquet file: {error}")
        return
    number = 0
    for batch in table.to_batches():  # a batch at a time: Python objects for one batch, not the file
        for row in batch.to_pylist():
            number += 1
            yield f"{uri}#row{number}", {k: v for k, v in row.items() if v is not None}
