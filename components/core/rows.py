"""Rows of user files (prompt sources, feedback) read so that nothing a file holds can crash a step.

`read_rows` yields (location, row) for JSONL (also `.ndjson`), CSV and Parquet files, by name in any case and
through one `.gz`. A row that cannot be read at all — invalid UTF-8 or JSON, JSON nested too deep, an integer
over Python's digit limit, a CSV field over the csv module's limit, a file that is no Parquet or gzip — comes
as an `Invalid` in its place, with a reason code, so the step can quarantine it and go on with the next.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, cast

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


def read_rows(uri: str, handle: BinaryIO) -> Iterator[tuple[str, Any]]:
    """(location, row or Invalid) for every row of a JSONL, CSV or Parquet file (see the module's text), read
    a row at a time from `handle`. CSV cells are strings, as written."""
    reader = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}.get(file_kind(uri) or "")
    if reader is not None:
        yield from unpacked(uri, handle, reader)


def unpacked(
    uri: str, handle: BinaryIO, reader: Callable[[str, BinaryIO], Iterator[tuple[str, Any]]]
) -> Iterator[tuple[str, Any]]:
    """`reader`'s rows of the file, decompressed as it is read when its name ends with `.gz`; a gzip stream
    that breaks off is an Invalid in place of the rest of the file."""
    if not uri.lower().endswith(".gz"):
        yield from reader(uri, handle)
        return
    try:
        with gzip.GzipFile(fileobj=handle) as unzipped:
            yield from reader(uri, cast(BinaryIO, unzipped))
    except (OSError, EOFError) as error:
        yield uri, Invalid("unreadable_file", f"not a readable gzip file: {error}")


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or an Invalid that says why not."""
    try:
        value = json.loads(text)
    except RecursionError:
        return Invalid("too_deep", "JSON nested deeper than the parser allows", text[:10_000])
    except ValueError as error:  # JSONDecodeError, and integers over Python's digit limit
        message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        return Invalid("invalid_json", f"invalid JSON: {message}", text[:10_000])
    if SURROGATE_ESCAPE.search(text):  # a pair of escapes is one character; one alone is no text at all
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return Invalid(
                "invalid_utf8", "a \\u escape stands for half a character (a lone surrogate)", text[:10_000]
            )
    return value


def utf8_error(uri: str, handle: BinaryIO) -> Invalid | None:
    """Why the rest of `handle` is not UTF-8 text, or None; read in chunks, then rewound."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        while chunk := handle.read(1 << 20):
            decoder.decode(chunk)
            offset += len(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        return Invalid(
            "invalid_utf8", f"{uri} is not UTF-8 text ({error.reason} at byte {offset + error.start})"
        )
    finally:
        handle.seek(0)
    return None


def _jsonl(uri: str, handle: BinaryIO) -> Iterator[tuple[str, Any]]:
    # Decoded line by line, so one line of bad bytes is one bad record; lines end at "\n" only.
    for number, raw in enumerate(handle, 1):
        if number == 1:
            raw = raw.removeprefix(BOM)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            shown = raw.decode("utf-8", "replace").removesuffix("\n")
            yield f"{uri}:{number}", Invalid("invalid_utf8", f"not UTF-8 text: {error.reason}", shown)
            continue
        for _, line in jsonl_lines(text):
            yield f"{uri}:{number}", parse_json(line)


def _csv(uri: str, handle: BinaryIO) -> Iterator[tuple[str, Any]]:
    invalid = utf8_error(uri, handle)
    if invalid is not None:
        yield uri, invalid
        return
    reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8-sig", newline=""))
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


def _parquet(uri: str, handle: BinaryIO) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        # A batch at a time: Arrow and Python objects for one batch, not the file.
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield f"{uri}#row{number}", {k: v for k, v in row.items() if v is not None}
    except (pa.ArrowException, OSError) as error:
        where = f"{uri}#row{number + 1}.." if number else uri
        yield where, Invalid("unreadable_file", f"not a readable Parquet file: {error}")
