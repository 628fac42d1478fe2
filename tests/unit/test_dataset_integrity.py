"""The feedback dataset keeps its promises: a damaged or missing file is one line naming it (never a silent
restart at version 1), versions are incremental and never overwritten, and two ingestions at once both end
in the dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_components import ingest_feedback
from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext
from rlhf_components.ingest_feedback import store
from rlhf_components.ingest_feedback.formats import Judgement
from rlhf_components.ingest_feedback.index import JudgementIndex, judgement_index

from ._helpers import make_context, read_jsonl, write_jsonl

P = "Review of the diner downtown:"


def _pairs(tag: str, count: int = 3) -> list[dict[str, str]]:
    return [
        {"prompt": f"{P} {tag} {i}", "chosen": f"lovely {tag}", "rejected": f"awful {tag}"}
        for i in range(count)
    ]


def _ingest(inbox: Path, context: RunContext, **config: Any) -> ingest_feedback.Outputs:
    return ingest_feedback.run(
        ingest_feedback.Config.model_validate(config), ingest_feedback.Inputs(inbox=str(inbox)), context
    )


@pytest.fixture
def dataset(tmp_path: Path, run_context: RunContext) -> Path:
    """An inbox whose dataset has two versions."""
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "labels" / "week-1.jsonl", _pairs("one"))
    _ingest(inbox, run_context)
    write_jsonl(inbox / "labels" / "week-2.jsonl", _pairs("two"))
    assert _ingest(inbox, make_context(tmp_path / "second")).dataset_version == 2
    return inbox / "dataset"


def load(root: str | Path) -> tuple[store.Snapshot, list[Judgement]]:
    """The latest version and every judgement in it, in dataset order."""
    with judgement_index() as index:
        snapshot = store.load(str(root), index)
        return snapshot, list(index.judgements())


def _lose_pointer_long_ago(dataset: Path) -> None:
    (dataset / "latest.json").unlink()
    claim = dataset / "v000001" / "claim.json"
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "time": time.time() - 3600}))


def _next_run(dataset: Path, tmp_path: Path) -> ingest_feedback.Outputs:
    write_jsonl(dataset.parent / "labels" / "week-3.jsonl", _pairs("three"))
    return _ingest(dataset.parent, make_context(tmp_path / f"run-{time.monotonic_ns()}"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "v000001" / "judgements.jsonl").write_text(
                (d / "v000001" / "judgements.jsonl").read_text()[:-40]
            ),
            r"v000001/judgements\.jsonl: does not match",
        ),
        (
            lambda d: (d / "v000002" / "judgements.jsonl").write_text(
                (d / "v000002" / "judgements.jsonl").read_text().replace('"choice": "b"', '"choice": "a"')
            ),
            r"v000002/judgements\.jsonl: does not match its manifest's sha256",
        ),
        (lambda d: (d / "v000001" / "ledger.jsonl").unlink(), r"v000001/ledger\.jsonl: missing"),
        (
            lambda d: (d / "v000002" / "manifest.json").write_text("{"),
            r"v000002/manifest\.json: not valid JSON",
        ),
        (
            lambda d: (d / "latest.json").write_text('{"version": "two"}'),
            r"latest\.json: not a dataset pointer",
        ),
        (_lose_pointer_long_ago, r"latest\.json is missing, but the dataset has versions v000001"),
    ],
)
def test_a_damaged_dataset_is_one_line_naming_the_file_and_nothing_is_overwritten(
    dataset: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    damage(dataset)
    with pytest.raises(UserError, match=message):
        _next_run(dataset, tmp_path)
    assert not (dataset / "v000003").exists()


def test_an_edit_that_keeps_each_file_consistent_still_breaks_the_content_hash(
    dataset: Path, tmp_path: Path
) -> None:
    """A version's files rewritten together with their checksums still cannot change what the dataset says."""
    version = dataset / "v000002"
    manifest = json.loads((version / "manifest.json").read_text())
    edited = (version / "judgements.jsonl").read_text().replace('"choice": "b"', '"choice": "a"')
    (version / "judgements.jsonl").write_text(edited)
    manifest["sha256"]["judgements.jsonl"] = __import__("hashlib").sha256(edited.encode()).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="do not add up to its content hash"):
        _next_run(dataset, tmp_path)


def test_versions_hold_only_what_they_changed_and_add_up(dataset: Path, tmp_path: Path) -> None:
    assert len(read_jsonl(dataset / "v000001" / "judgements.jsonl")) == 3
    assert len(read_jsonl(dataset / "v000002" / "judgements.jsonl")) == 3
    outputs = _next_run(dataset, tmp_path)
    assert outputs.dataset_version == 3 and outputs.counts["judgements"] == 9
    assert len(read_jsonl(dataset / "v000003" / "judgements.jsonl")) == 3
    snapshot, judgements = load(dataset)
    assert snapshot.version == 3 and len(judgements) == 9 and len(snapshot.ledger) == 3


def test_a_rerun_with_nothing_new_reads_no_judgements_and_reuses_the_pairs_made_before(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _ingest(dataset.parent, make_context(tmp_path / "made"))
    pairs = read_jsonl(Path(made.train)) + read_jsonl(Path(made.eval))
    monkeypatch.setattr(store, "load", lambda *_: pytest.fail("the rerun read every judgement again"))
    again = _ingest(dataset.parent, make_context(tmp_path / "again"))
    assert (again.dataset_version, again.counts["read"], again.counts["judgements"]) == (2, 0, 6)
    assert (again.train, again.eval, again.content_hash) == (made.train, made.eval, made.content_hash)
    assert again.train.startswith(str(dataset / "v000002" / "pairs-"))
    monkeypatch.undo()
    # Other pair settings make their own pairs from the same version; removed pairs are made again.
    halves = _ingest(dataset.parent, make_context(tmp_path / "halves"), eval_fraction=0.5)
    assert Path(halves.train).parent != Path(made.train).parent
    assert sorted(map(str, read_jsonl(Path(halves.train)) + read_jsonl(Path(halves.eval)))) == sorted(
        map(str, pairs)
    )
    Path(made.train).unlink()
    remade = _ingest(dataset.parent, make_context(tmp_path / "remade"))
    assert read_jsonl(Path(remade.train)) + read_jsonl(Path(remade.eval)) == pairs


def test_a_version_taken_by_another_ingestion_is_read_back_and_the_next_one_written(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """This run read version 2, then another ingestion wrote version 3 before this one could."""
    write_jsonl(dataset.parent / "labels" / "other.jsonl", _pairs("other"))
    _ingest(dataset.parent, make_context(tmp_path / "other"))  # the other ingestion: version 3
    real_load = store.load
    loads: list[int] = []

    def stale_first(root: str, index: JudgementIndex) -> store.Snapshot:
        snapshot = real_load(root, index)
        loads.append(snapshot.version)
        return snapshot if len(loads) > 1 else store.Snapshot(version=2, ledger=snapshot.ledger[:2])

    monkeypatch.setattr(store, "load", stale_first)
    outputs = _next_run(dataset, tmp_path)
    assert "version 3 of" in caplog.text and "was taken by another ingestion" in caplog.text
    assert outputs.dataset_version == 4
    _, judgements = load(dataset)
    tags = {j.prompt.split()[-2] for j in judgements if isinstance(j.prompt, str)}
    assert tags == {"one", "two", "other", "three"}, "no ingestion's judgements were lost"


def test_a_first_version_between_its_manifest_and_its_pointer_is_waited_for(tmp_path: Path) -> None:
    """Another ingestion has written version 1's manifest and not yet its pointer: this one reads version 1
    once the pointer lands, rather than calling the dataset damaged (a race CI once hit)."""
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "labels" / "week-1.jsonl", _pairs("one"))
    _ingest(inbox, make_context(tmp_path / "first"))
    pointer = inbox / "dataset" / "latest.json"
    pointer.unlink()
    restore = threading.Timer(1.0, lambda: pointer.write_text('{"version": 1}'))
    restore.start()
    started = time.monotonic()
    assert store.head(str(inbox / "dataset")).version == 1
    assert time.monotonic() - started >= 0.9
    restore.join()


def test_an_abandoned_claim_is_one_line_not_an_endless_retry(dataset: Path, tmp_path: Path) -> None:
    claim = dataset / "v000003" / "claim.json"
    claim.parent.mkdir()
    claim.write_text(json.dumps({"claimant": "crashed", "time": time.time() - 3600}))
    with pytest.raises(UserError, match=r"v000003 was claimed \d+ s ago and never completed"):
        _next_run(dataset, tmp_path)


def test_a_dataset_written_as_full_copies_still_loads_and_grows_by_deltas(
    tmp_path: Path, run_context: RunContext
) -> None:
    """Versions written before the incremental layout: every judgement in each, no `parent`."""
    inbox = tmp_path / "inbox"
    write_jsonl(inbox / "labels" / "week-1.jsonl", _pairs("one"))
    _ingest(inbox, run_context)
    version = inbox / "dataset" / "v000001"
    manifest = json.loads((version / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in {"parent", "format", "sha256", "new_judgements"}}
    (version / "manifest.json").write_text(json.dumps(old))
    (version / "claim.json").unlink()
    write_jsonl(inbox / "labels" / "week-2.jsonl", _pairs("two"))
    outputs = _ingest(inbox, make_context(tmp_path / "second"))
    assert outputs.dataset_version == 2 and outputs.counts["judgements"] == 6


def two_ingestions_at_once(inbox: str, tmp_path: Path) -> tuple[store.Snapshot, list[Judgement]]:
    """Two real processes ingest one inbox (local or s3://), each with its own file besides the shared
    labels; returns the dataset they leave."""
    storage.write_jsonl(storage.join(inbox, "labels", "shared.jsonl"), _pairs("shared"))
    processes = []
    for name in ("left", "right"):
        own = write_jsonl(tmp_path / f"{name}.jsonl", _pairs(name, 40))
        job = {
            "context": {
                "tracking": {"uri": f"sqlite:///{tmp_path / name}.db", "experiment": name},
                "output_root": str(tmp_path / name),
            },
            "inputs": {"inbox": inbox},
            "config": {"sources": [str(own)]},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
        command = [
            sys.executable,
            "-m",
            "rlhf_components.ingest_feedback",
            "--config",
            str(tmp_path / f"{name}.yaml"),
        ]
        processes.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "RLHF_NO_PROGRESS": "1"},
            )
        )
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    return load(storage.join(inbox, "dataset"))


def assert_nothing_lost(dataset: tuple[store.Snapshot, list[Judgement]]) -> None:
    snapshot, judgements = dataset
    tags = {j.prompt.split()[-2] for j in judgements if isinstance(j.prompt, str)}
    assert tags == {"shared", "left", "right"} and len(judgements) == 3 + 40 + 40
    versions = sorted(entry.version for entry in snapshot.ledger)
    assert versions in ([1, 1, 2], [1, 2, 2], [1, 2, 3]), versions


@pytest.mark.slow
def test_two_ingestions_at_once_both_end_in_the_dataset(tmp_path: Path) -> None:
    """No judgement is lost, and no version is written twice."""
    assert_nothing_lost(two_ingestions_at_once(str(tmp_path / "inbox"), tmp_path))
