"""Local paths and `s3://` URIs behind one small interface.

S3 goes through boto3 with its standard configuration chain: credentials from the environment, profile or
instance role; the endpoint from `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for S3-compatible stores.
Writes are atomic: a local file is written to a temporary name and renamed; an S3 PUT is atomic by itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from rlhf_components.core.errors import UserError

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
MODELS_PREFIX = "models:/"  # an MLflow registry URI, resolved by core.models


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise UserError(f"{uri}: an s3:// URI needs a bucket name")
    return bucket, key


S3_RETRY_WINDOW_ENV = "RLHF_S3_RETRY_WINDOW_S"
S3_RETRY_WINDOW_S = 60.0
# Answers that mean "try again later" rather than "no".
S3_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


@lru_cache(maxsize=1)
def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # Quick retries inside botocore; `_s3_call` waits out longer outages.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.session.Session().client("s3", config=config)


class S3Refused(UserError):
    """S3 answered a request with an error that retrying does not cure."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def s3_retry_window() -> float:
    """Seconds an S3 request keeps being retried through transient failures ($RLHF_S3_RETRY_WINDOW_S)."""
    raw = os.environ.get(S3_RETRY_WINDOW_ENV, str(S3_RETRY_WINDOW_S))
    try:
        window = float(raw)
    except ValueError:
        window = -1.0
    if not 0 <= window <= 3600:
        raise UserError(f"{S3_RETRY_WINDOW_ENV}: {raw!r} is not a number of seconds between 0 and 3600")
    return window


def _s3_call(uri: str, action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried with backoff (0.5 s doubling to 8 s) through connection failures,
    throttling and 5xx answers until the retry window is spent; then, or on any other error, one line."""
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    deadline = time.monotonic() + s3_retry_window()
    delay = 0.5
    while True:
        try:
            return call(*args, **kwargs)
        except NoCredentialsError:
            raise UserError(
                f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
            ) from None
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "?"))
            if code in {"404", "NoSuchKey", "NotFound"}:
                raise FileNotFoundError(uri) from None
            if code not in S3_TRANSIENT_CODES:
                raise S3Refused(f"{uri}: S3 {action} failed: {code}: {error}", code) from None
            failure = f"{code}: {error}"
        except (S3ConnectionError, HTTPClientError) as error:
            failure = str(error)
        except BotoCoreError as error:
            raise UserError(f"{uri}: S3 {action} failed: {error}") from None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UserError(
                f"{uri}: S3 {action} failed for {s3_retry_window():g} s ({failure}); "
                f"{S3_RETRY_WINDOW_ENV} sets how long to retry"
            )
        log.warning("%s: S3 %s failed (%s); retrying", uri, action, failure)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 8.0)


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    if key and not key.endswith("/"):
        try:
            _s3_call(uri, "HEAD", s3_client().head_object, Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            pass
    return bool(list_files(uri))


def read_bytes(uri: str) -> bytes:
    with reading(uri) as handle:
        return handle.read()


@contextmanager
def reading(uri: str) -> Iterator[BinaryIO]:
    """A seekable binary file with the content of `uri`: the local file itself, or an S3 object downloaded
    to a temporary file (so a large object never sits in memory, and can be read twice)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise UserError(f"{uri}: file not found")
        with path.open("rb") as local:
            yield local
        return
    bucket, key = split_s3(uri)

    def download(handle: BinaryIO) -> None:
        # The body is read inside the retried call: a connection can drop in the middle of it.
        handle.seek(0)
        handle.truncate()
        shutil.copyfileobj(s3_client().get_object(Bucket=bucket, Key=key)["Body"], handle)
        handle.seek(0)

    with tempfile.TemporaryFile() as downloaded:
        try:
            _s3_call(uri, "GET", download, downloaded)
        except FileNotFoundError:
            raise UserError(f"{uri}: object not found") from None
        yield downloaded


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    with writing(uri) as handle:
        handle.write(data)


@contextmanager
def writing(uri: str) -> Iterator[BinaryIO]:
    """A binary file to write `uri` through, in any size: it appears complete when the block ends, or not at
    all (a local temporary file renamed into place; on S3 a temporary file PUT at the end)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def upload(handle: BinaryIO) -> None:
            handle.seek(0)
            s3_client().put_object(Bucket=bucket, Key=key, Body=handle)

        with tempfile.TemporaryFile() as staged:
            yield staged
            _s3_call(uri, "PUT", upload, staged)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        try:
            yield handle  # type: ignore[misc]  # a file of bytes, whatever its wrapper
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` with `data` only if nothing is there; False when something is (another writer was
    first). Locally a complete temporary file is hard-linked into place; on S3 a conditional PUT
    (If-None-Match: *) does the same."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _s3_call(uri, "PUT", s3_client().put_object, Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except S3Refused as refused:
            if refused.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            raise
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
    try:
        os.link(handle.name, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(handle.name)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, value: Any) -> None:
    write_text(uri, json.dumps(value, indent=2, sort_keys=True) + "\n")


def list_files(prefix: str) -> list[str]:
    """Every file under a directory or S3 prefix, as full URIs, sorted."""
    if not is_s3(prefix):
        root = Path(prefix)
        if root.is_file():
            return [str(root)]
        if not root.is_dir():
            return []
        visible = (p for p in root.rglob("*") if not p.name.startswith("."))
        return sorted(str(p) for p in visible if _inside(root, p) and p.is_file())
    bucket, key = split_s3(prefix)
    if key and not key.endswith("/"):
        # Like a local path: the object itself, or the "directory" of that name, never name-prefixed siblings.
        try:
            _s3_call(prefix, "HEAD", s3_client().head_object, Bucket=bucket, Key=key)
            return [prefix]
        except FileNotFoundError:
            key += "/"
    return sorted(_s3_objects(prefix, bucket, key))


def _inside(root: Path, path: Path) -> bool:
    """False (and a warning) for a symbolic link that leads out of `root`: a shared inbox must not become a
    way to read any file the job can see."""
    if not path.is_symlink() or path.resolve().is_relative_to(root.resolve()):
        return True
    log.warning("%s: a symbolic link to %s, outside %s; not followed", path, path.resolve(), root)
    return False


def _s3_objects(uri: str, bucket: str, key_prefix: str) -> dict[str, str]:
    """{object URI: ETag} under a key prefix, hidden (dot) files left out as locally."""
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = _s3_call(uri, "LIST", lambda: list(paginator.paginate(Bucket=bucket, Prefix=key_prefix)))
    return {
        f"{S3_PREFIX}{bucket}/{item['Key']}": item["ETag"]
        for page in pages
        for item in page.get("Contents", [])
        if not item["Key"].rsplit("/", 1)[-1].startswith(".")
    }


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copy a local directory to `uri`; locally via a temporary sibling renamed into place."""
    if is_s3(uri):
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                write_bytes(join(uri, path.relative_to(local_dir).as_posix()), path.read_bytes())
        return
    target = Path(uri)
    if target.resolve() == local_dir.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    shutil.copytree(local_dir, staging, dirs_exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def remove(uri: str) -> None:
    """Delete a file or everything under a directory/prefix; missing is fine."""
    if not is_s3(uri):
        path = Path(uri)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    bucket = split_s3(uri)[0]
    keys = [split_s3(f)[1] for f in list_files(uri)]
    for start in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": key} for key in keys[start : start + 1000]], "Quiet": True}
        _s3_call(uri, "DELETE", s3_client().delete_objects, Bucket=bucket, Delete=batch)


def cache_dir() -> Path:
    root = Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf-pipelines"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_dir(uri: str) -> Path:
    """A local directory holding the files under `uri`: the path itself, or a cached S3 download.

    The cache key includes every object's ETag, so a changed prefix is downloaded again.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise UserError(f"{uri}: directory not found")
        return path
    prefix = uri.rstrip("/") + "/"
    bucket, key_prefix = split_s3(prefix)
    objects = _s3_objects(prefix, bucket, key_prefix)  # the listing carries the ETags: no HEAD per object
    if not objects:
        raise UserError(f"{uri}: no objects under this S3 prefix")
    files = sorted(objects)
    digest = hashlib.sha256(json.dumps([prefix, files, [objects[f] for f in files]]).encode()).hexdigest()[
        :20
    ]
    target = cache_dir() / "s3" / digest
    if target.is_dir():
        return target
    with staging_dir(target) as staging:
        for file_uri in files:
            relative = split_s3(file_uri)[1][len(key_prefix) :]
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(read_bytes(file_uri))
    return target


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target`, renamed to it on success and removed on failure.

    Another process (say, a second torchrun rank) may finish the same target first; its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for every non-empty line of JSONL text. Lines end at "\\n" only (a trailing "\\r"
    is dropped): U+2028, U+0085 and the like inside a JSON string are text, which `str.splitlines` would
    split a record at."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line.removesuffix("\r")


def read_jsonl(uri: str) -> Iterator[tuple[int, str]]:
    """(line number, raw line) for every non-empty line, read a line at a time: parsing is the caller's, so
    it can quarantine."""
    with reading(uri) as handle:
        yield from file_lines(handle)


def file_lines(handle: BinaryIO) -> Iterator[tuple[int, str]]:
    """`jsonl_lines` of a UTF-8 file, a line at a time (a binary file splits at b"\\n" only)."""
    for number, raw in enumerate(handle, start=1):
        line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        if line.strip():
            yield number, line


def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n"


class JsonlFile:
    """Rows written to one JSONL file as they come, with their count and the file's sha256."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self.write_line(jsonl_line(row))

    def write_line(self, line: str) -> None:
        data = line.encode("utf-8")
        self._handle.write(data)
        self._digest.update(data)
        self.rows += 1

    def sha256(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def writing_jsonl(uri: str) -> Iterator[JsonlFile]:
    with writing(uri) as handle:
        yield JsonlFile(handle)


def write_jsonl(uri: str, rows: Iterable[dict[str, Any]]) -> int:
    with writing_jsonl(uri) as out:
        for row in rows:
            out.write(row)
    return out.rows


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ContentHash:
    """`content_hash` of rows added one at a time: the same digest, without the list in memory."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"[")
        self._first = True

    def add(self, row: Any) -> None:
        self.add_json(json.dumps(row, sort_keys=True, ensure_ascii=False))

    def add_json(self, canonical: str) -> None:
        """A row already dumped as `add` would (sorted keys, not ASCII-escaped)."""
        self._digest.update((canonical if self._first else ", " + canonical).encode())
        self._first = False

    def hexdigest(self) -> str:
        final = self._digest.copy()
        final.update(b"]")
        return final.hexdigest()


def content_hash(rows: Iterable[Any]) -> str:
    """A dataset version: changes with any content, independent of where the rows came from (the sha256 of
    the rows as one JSON list)."""
    digest = ContentHash()
    for row in rows:
        digest.add(row)
    return digest.hexdigest()
