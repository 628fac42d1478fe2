"""Local storage semantics, and what an unreachable S3 endpoint looks like to the user."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path) -> None:
    target = str(tmp_path / "a" / "b.json")
    storage.write_json(target, {"x": 1})
    storage.write_json(target, {"x": 2})
    assert storage.read_json(target) == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_a_streamed_write_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    storage.write_jsonl(str(target), [{"a": 1}])
    with pytest.raises(RuntimeError), storage.writing_jsonl(str(target)) as out:
        out.write({"a": 2})
        raise RuntimeError("the step died half way")
    assert target.read_text() == '{"a": 1}\n', "the earlier file is untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_jsonl_round_trip_keeps_line_numbers_for_quarantine(tmp_path: Path) -> None:
    uri = str(tmp_path / "rows.jsonl")
    assert storage.write_jsonl(uri, [{"a": 1}, {"a": "é"}]) == 2
    Path(uri).write_text(Path(uri).read_text() + "\n{broken\n", encoding="utf-8")
    assert list(storage.read_jsonl(uri)) == [(1, '{"a": 1}'), (2, '{"a": "é"}'), (4, "{broken")]


def test_content_hash_depends_on_content_not_key_order() -> None:
    assert storage.content_hash([{"a": 1, "b": 2}]) == storage.content_hash([{"b": 2, "a": 1}])
    assert storage.content_hash([{"a": 1}]) != storage.content_hash([{"a": 2}])


def test_content_hash_is_the_sha256_of_the_rows_as_one_json_list_however_it_is_fed() -> None:
    """Written independently: dataset manifests made before the streaming hash must still check."""
    import hashlib
    import json

    rows = [{"b": "é\u2028", "a": [1, 2.5]}, {"prompt": [{"role": "user", "content": "hi"}]}, {}]
    expected = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert storage.content_hash(rows) == storage.content_hash(iter(rows)) == expected
    assert storage.content_hash([]) == hashlib.sha256(b"[]").hexdigest()


def test_join_and_scheme_detection() -> None:
    assert storage.join("s3://bucket/root/", "/run", "step/") == "s3://bucket/root/run/step"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3:/x")
    with pytest.raises(UserError, match="bucket"):
        storage.split_s3("s3:///key")


def test_missing_local_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        storage.read_bytes(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="directory not found"):
        storage.local_dir(str(tmp_path / "nope"))


def test_unreachable_s3_endpoint_is_one_clear_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) is closed on this machine: the connection is refused at once.
    for key, value in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RLHF_S3_RETRY_WINDOW_S": "0",
    }.items():
        monkeypatch.setenv(key, value)
    storage.s3_client.cache_clear()
    try:
        with pytest.raises(UserError, match=r"^s3://bucket/key: S3 GET failed for 0 s \(Could not connect"):
            storage.read_bytes("s3://bucket/key")
        with pytest.raises(UserError, match="S3 PUT failed for 0 s"):
            storage.write_bytes("s3://bucket/key", b"x")
    finally:
        storage.s3_client.cache_clear()


def test_create_exclusive_is_first_writer_wins_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "claims" / "v000001.json"
    assert storage.create_exclusive(str(target), b"first")
    assert not storage.create_exclusive(str(target), b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["v000001.json"]


def test_jsonl_lines_end_at_newlines_only() -> None:
    text = '{"a": "x\u2028y"}\r\n\n{"b": "\u0085"}\n'
    assert list(storage.jsonl_lines(text)) == [(1, '{"a": "x\u2028y"}'), (3, '{"b": "\u0085"}')]
