"""`storage` against a real S3 wire protocol (moto over HTTP), and local/S3 parity for the same operations."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError

from .conftest import S3Server, _s3_client

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    # The moto server lives for the whole session: every test writes under its own prefix.
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def s3_root(s3_server: S3Server) -> str:
    return s3_server.uri(_unique("storage"))


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run on a local directory and on an S3 prefix: the interface promises one behaviour."""
    if request.param == "local":
        return str(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3_server")
    return server.uri(_unique("parity"))


def _raw_get(s3_server: S3Server, uri: str) -> bytes:
    """Read with an independent boto3 client, so a pass proves the bytes really reached the server."""
    bucket, key = storage.split_s3(uri)
    body: Any = _s3_client(s3_server.endpoint).get_object(Bucket=bucket, Key=key)["Body"]
    return bytes(body.read())


# --- S3 wire behaviour -------------------------------------------------------------------------------------


def test_bytes_and_json_round_trip_over_the_wire(s3_server: S3Server, s3_root: str) -> None:
    blob = bytes(range(256)) * 4  # every byte value: no text decoding anywhere on the path
    storage.write_bytes(storage.join(s3_root, "blob.bin"), blob)
    assert storage.read_bytes(storage.join(s3_root, "blob.bin")) == blob
    assert _raw_get(s3_server, storage.join(s3_root, "blob.bin")) == blob

    value = {"name": "rlhf", "scores": [0.25, -1.5], "nested": {"ok": True, "text": "naïve ✓"}}
    storage.write_json(storage.join(s3_root, "meta/value.json"), value)
    assert storage.read_json(storage.join(s3_root, "meta/value.json")) == value
    assert json.loads(_raw_get(s3_server, storage.join(s3_root, "meta/value.json"))) == value


def test_list_files_on_a_prefix(s3_root: str) -> None:
    for name in ("data/a.jsonl", "data/sub/b.jsonl", "other/c.jsonl"):
        storage.write_bytes(storage.join(s3_root, name), name.encode())
    assert storage.list_files(storage.join(s3_root, "data") + "/") == [
        storage.join(s3_root, "data/a.jsonl"),
        storage.join(s3_root, "data/sub/b.jsonl"),
    ]
    assert len(storage.list_files(s3_root + "/")) == 3
    assert storage.list_files(storage.join(s3_root, "nothing-here") + "/") == []


def test_exists_for_object_and_prefix(s3_root: str) -> None:
    storage.write_bytes(storage.join(s3_root, "dir/file.txt"), b"x")
    assert storage.exists(storage.join(s3_root, "dir/file.txt"))
    # No object is called "dir": exists() must fall back to listing the prefix.
    assert storage.exists(storage.join(s3_root, "dir"))
    assert storage.exists(storage.join(s3_root, "dir") + "/")
    assert not storage.exists(storage.join(s3_root, "dir/missing.txt"))
    assert not storage.exists(storage.join(s3_root, "missing-dir"))


def test_upload_dir_then_local_dir_with_etag_cache(s3_server: S3Server, s3_root: str, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "nested" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    uri = storage.join(s3_root, "checkpoint")
    storage.upload_dir(source, uri)
    assert storage.list_files(uri + "/") == [
        storage.join(uri, "config.json"),
        storage.join(uri, "nested/weights.bin"),
    ]

    first = storage.local_dir(uri)
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()) == [
        "config.json",
        "nested/weights.bin",
    ]
    assert (first / "nested" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    assert first.is_relative_to(storage.cache_dir())

    # Unchanged objects (same ETags): the cached copy is reused, not downloaded again.
    (first / "marker").write_text("proof the same directory came back")
    assert storage.local_dir(uri) == first
    assert storage.local_dir(uri + "/") == first  # a trailing slash names the same prefix

    # A changed object changes its ETag and so the cache key: a fresh download with the new bytes.
    storage.write_bytes(storage.join(uri, "config.json"), b'{"a": 2}')
    second = storage.local_dir(uri)
    assert second != first
    assert (second / "config.json").read_bytes() == b'{"a": 2}'
    assert not (second / "marker").exists()
    assert (first / "config.json").read_bytes() == b'{"a": 1}'  # the old cache entry is left intact


def test_local_dir_of_an_empty_prefix_is_a_user_error(s3_root: str) -> None:
    uri = storage.join(s3_root, "empty")
    with pytest.raises(UserError, match="no objects") as caught:
        storage.local_dir(uri)
    assert uri in str(caught.value)


def test_missing_object_is_a_user_error_naming_the_uri(s3_root: str) -> None:
    uri = storage.join(s3_root, "does/not/exist.json")
    with pytest.raises(UserError) as caught:
        storage.read_bytes(uri)
    assert uri in str(caught.value)
    assert "not found" in str(caught.value)
    with pytest.raises(UserError, match="not found"):
        storage.read_json(uri)


def test_missing_bucket_is_a_user_error(s3_server: S3Server) -> None:
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/key.txt"
    with pytest.raises(UserError) as caught:
        storage.read_bytes(uri)
    assert uri in str(caught.value)


@pytest.mark.parametrize("uri", ["s3:///key.txt", "s3://", "s3:///"])
def test_bucketless_uri_is_a_user_error(s3_server: S3Server, uri: str) -> None:
    with pytest.raises(UserError, match="needs a bucket name"):
        storage.read_bytes(uri)
    with pytest.raises(UserError, match="needs a bucket name"):
        storage.write_bytes(uri, b"x")


# --- local and S3 behave the same -------------------------------------------------------------------------


def test_parity_bytes_json_jsonl(root: str) -> None:
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00abc\xff")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00abc\xff"

    storage.write_json(storage.join(root, "deep/x/v.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(root, "deep/x/v.json")) == {"k": [1, 2]}
    # Same canonical text on both back ends (sorted keys, trailing newline): hashes of it must agree.
    assert storage.read_text(storage.join(root, "deep/x/v.json")) == '{\n  "k": [\n    1,\n    2\n  ]\n}\n'

    rows = [{"prompt": "p1", "n": 1}, {"prompt": "p2 ✓", "n": 2}]
    assert storage.write_jsonl(storage.join(root, "rows.jsonl"), rows) == 2
    lines = list(storage.read_jsonl(storage.join(root, "rows.jsonl")))
    assert [number for number, _ in lines] == [1, 2]
    assert [json.loads(line) for _, line in lines] == rows

    # Overwrite replaces the content on both back ends.
    storage.write_bytes(storage.join(root, "a.bin"), b"new")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"new"


def test_parity_listing_and_exists(root: str) -> None:
    for name in ("d/1.txt", "d/e/2.txt", "f.txt"):
        storage.write_bytes(storage.join(root, name), b"x")
    assert storage.list_files(storage.join(root, "d")) == [
        storage.join(root, "d/1.txt"),
        storage.join(root, "d/e/2.txt"),
    ]
    assert storage.list_files(root) == [
        storage.join(root, "d/1.txt"),
        storage.join(root, "d/e/2.txt"),
        storage.join(root, "f.txt"),
    ]
    assert storage.list_files(storage.join(root, "f.txt")) == [storage.join(root, "f.txt")]
    assert storage.list_files(storage.join(root, "missing")) == []
    assert storage.exists(storage.join(root, "f.txt"))
    assert storage.exists(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "missing"))


def test_parity_listing_a_directory_excludes_name_prefixed_siblings(root: str) -> None:
    """`tasks` must not list `tasks_archive/…`: ingest_feedback lists `<inbox>/tasks` this way."""
    storage.write_bytes(storage.join(root, "tasks/1.json"), b"{}")
    storage.write_bytes(storage.join(root, "tasks_archive/old.json"), b"{}")
    assert storage.list_files(storage.join(root, "tasks")) == [storage.join(root, "tasks/1.json")]


def test_parity_upload_dir_and_local_dir(root: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("A")
    (source / "sub" / "b.txt").write_text("B")
    target = storage.join(root, "copy")
    storage.upload_dir(source, target)
    local = storage.local_dir(target)
    assert {p.relative_to(local).as_posix(): p.read_text() for p in local.rglob("*") if p.is_file()} == {
        "a.txt": "A",
        "sub/b.txt": "B",
    }
    assert storage.list_files(target) == [storage.join(target, "a.txt"), storage.join(target, "sub/b.txt")]


def test_parity_missing_file_is_a_user_error(root: str) -> None:
    uri = storage.join(root, "nope.json")
    with pytest.raises(UserError, match="not found") as caught:
        storage.read_json(uri)
    assert uri in str(caught.value)
    with pytest.raises(UserError) as caught_dir:
        storage.local_dir(storage.join(root, "no-dir"))
    assert storage.join(root, "no-dir") in str(caught_dir.value)


def test_create_exclusive_is_first_writer_wins_over_the_wire(s3_root: str) -> None:
    uri = storage.join(s3_root, "claims", "v000001.json")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
