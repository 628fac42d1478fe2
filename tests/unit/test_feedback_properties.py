"""Property-based tests of ingest_feedback (hypothesis): random and malformed records, mixed with valid ones
of every shape, must each end in the dataset or in the quarantine — never both, never neither — and a rerun
must change nothing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_components import ingest_feedback
from rlhf_components.core.errors import UserError
from rlhf_components.core.tracking import RunContext

from ._helpers import read_jsonl

# Empties, self-pairs, repeats, characters that other tools take for line breaks or byte-order marks, a NUL,
# and half a character (a lone surrogate: no text at all).
TEXTS = st.sampled_from(
    [
        "",
        " ",
        "good",
        "bad",
        "ok",
        "great",
        "good ",
        "a\u2028b",
        "c\u0085d",
        "e\u2029",
        "\ufefff",
        "n\x00l",
        "\ud800",
    ]
)
PROMPTS = st.sampled_from(["Review:", "Other:", ""])
ANNOTATORS = st.sampled_from(["ann", "bob", "cy"])

CHOSEN_REJECTED = st.fixed_dictionaries(
    {"prompt": PROMPTS, "chosen": TEXTS, "rejected": TEXTS}, optional={"annotator": ANNOTATORS}
)
CHOICE = st.fixed_dictionaries(
    {
        "prompt": PROMPTS,
        "response_a": TEXTS,
        "response_b": TEXTS,
        "choice": st.sampled_from(["a", "b", "tie", "c"]),
        "annotator": ANNOTATORS,
    }
)
RATING = st.fixed_dictionaries(
    {
        "prompt": PROMPTS,
        "response": TEXTS,
        "rating": st.one_of(st.integers(-1, 7), st.booleans(), st.floats()),
    },  # true is no rating, nor is NaN
    optional={"annotator": ANNOTATORS},
)
RANKING = st.fixed_dictionaries(
    {
        "prompt": PROMPTS,
        "responses": st.lists(TEXTS, min_size=1, max_size=4),
        "ranking": st.lists(st.integers(0, 4), max_size=4),
        "annotator": ANNOTATORS,
    }
)
JUNK = st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.lists(st.integers(), max_size=3),
    st.integers(),
    st.text(max_size=10),
)
RECORD = st.one_of(CHOSEN_REJECTED, CHOICE, RATING, RANKING, JUNK)
LINE = st.one_of(
    # Escaped or written out (a lone surrogate written out is bytes that are no UTF-8).
    RECORD.map(lambda record: json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    RECORD.map(lambda record: json.dumps(record).encode()),
    st.sampled_from(
        [
            b'{"prompt": "Review',
            b"not json",
            b"[1,",
            b"[" * 5000 + b"]" * 5000,
            b"1" * 5000,
            b'{"prompt": "P", "chosen": "caf\xe9", "rejected": "b"}',
            b"\xff\xfe\x00",
        ]
    ),
)


def ingest(inbox: Path, context: RunContext) -> ingest_feedback.Outputs | None:
    try:
        config = ingest_feedback.Config(max_invalid_fraction=1.0)
        return ingest_feedback.run(config, ingest_feedback.Inputs(inbox=str(inbox)), context)
    except UserError as error:  # too few pairs to train on: the dataset is still written
        assert "usable preference pairs" in str(error)
        return None


def dataset_locations(inbox: Path) -> set[str]:
    version = json.loads((inbox / "dataset" / "latest.json").read_text())["version"]
    judgements = read_jsonl(inbox / "dataset" / f"v{version:06d}" / "judgements.jsonl")
    return {source for judgement in judgements for source in judgement["sources"]}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.lists(st.lists(LINE, min_size=1, max_size=12), min_size=1, max_size=3),
    byte_order_marks=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_every_record_ends_in_the_dataset_or_the_quarantine_once(
    files: list[list[bytes]], byte_order_marks: list[bool], run_context: RunContext
) -> None:
    with tempfile.TemporaryDirectory() as temp:
        inbox = Path(temp, "inbox")
        (inbox / "labels").mkdir(parents=True)
        locations = set()
        for index, lines in enumerate(files):
            path = inbox / "labels" / f"f{index}.jsonl"
            bom = b"\xef\xbb\xbf" if byte_order_marks[index] else b""
            path.write_bytes(bom + b"\n".join(lines) + b"\n")
            locations |= {f"{path}:{n}" for n, line in enumerate(lines, 1) if line.strip()}
        if len({p.read_bytes() for p in (inbox / "labels").iterdir()}) < len(files):
            return  # identical files are one file's content: the ledger reads it once (tested elsewhere)

        first = ingest(inbox, run_context)
        kept = dataset_locations(inbox)
        quarantined = [row["location"] for row in read_jsonl(_quarantine(run_context, first))]
        assert len(quarantined) == len(set(quarantined))
        assert kept.isdisjoint(quarantined)
        assert kept | set(quarantined) == locations

        again = ingest(inbox, run_context)
        assert dataset_locations(inbox) == kept
        assert json.loads((inbox / "dataset" / "latest.json").read_text())["version"] == 1
        if first is not None and again is not None:
            assert again.counts["read"] == 0
            assert read_jsonl(again.train) == read_jsonl(first.train)
            assert read_jsonl(again.eval) == read_jsonl(first.eval)


def _quarantine(context: RunContext, outputs: Any) -> Path:
    if outputs is not None:
        return Path(outputs.quarantine)
    return Path(context.output_root, context.parent_run_id, "ingest_feedback", "quarantine.jsonl")
