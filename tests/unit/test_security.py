"""What a shared inbox, a URI with a password in it or a checkpoint with code of its own must not do: read
files outside the inbox, show the password anywhere, run foreign code unannounced."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest

from rlhf_components import ingest_feedback
from rlhf_components.core.config import ModelStep
from rlhf_components.core.errors import UserError, redacted
from rlhf_components.core.models import load_policy
from rlhf_components.core.runtime import setup_logging
from rlhf_components.core.tracking import RunContext, check_reachable, step_run

from . import chat_models
from ._helpers import write_jsonl

SECRET = "hunter2-s3cret"
P = "Review of the diner downtown:"
OWN = (("lovely", "awful"), ("kind", "rude"))


def test_symbolic_links_out_of_the_inbox_are_not_followed_and_are_reported(
    tmp_path: Path, run_context: RunContext, caplog: pytest.LogCaptureFixture
) -> None:
    labels = tmp_path / "inbox" / "labels"
    own = [{"prompt": P, "chosen": good, "rejected": bad} for good, bad in OWN]
    write_jsonl(labels / "own.jsonl", own)
    elsewhere = tmp_path / "private"
    write_jsonl(elsewhere / "secrets.jsonl", [{"prompt": P, "chosen": SECRET, "rejected": "x"}])
    (labels / "file-link.jsonl").symlink_to(elsewhere / "secrets.jsonl")
    (labels / "dir-link").symlink_to(elsewhere, target_is_directory=True)
    (labels / "inside-link.jsonl").symlink_to(labels / "own.jsonl")  # inside the inbox: read like any file
    with caplog.at_level(logging.WARNING):
        outputs = ingest_feedback.run(
            ingest_feedback.Config(), ingest_feedback.Inputs(inbox=str(tmp_path / "inbox")), run_context
        )
    assert outputs.counts["judgements"] == 2  # own.jsonl's, which the inside link repeats
    dataset = Path(outputs.train).read_text() + Path(outputs.eval).read_text()
    assert SECRET not in dataset and "lovely" in dataset
    refused = [r.getMessage() for r in caplog.records if "not followed" in r.getMessage()]
    assert len(refused) == 2 and all(str(elsewhere) in line for line in refused)
    assert "file-link.jsonl" in refused[0] + refused[1] and "dir-link" in refused[0] + refused[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"https://bob:{SECRET}@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
        (
            f"postgresql://u:{SECRET}@db:5432/m and s3://bucket/a@b",
            "postgresql://***@db:5432/m and s3://bucket/a@b",
        ),
        (f"https://{SECRET}@host", "https://***@host"),
        ("mail me at bob@example.com, see http://host/a", "mail me at bob@example.com, see http://host/a"),
    ],
)
def test_credentials_in_uris_are_redacted(text: str, expected: str) -> None:
    assert redacted(text) == expected


def test_credentials_never_reach_an_error_a_log_line_or_mlflow(
    run_context: RunContext, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"http://admin:{SECRET}@127.0.0.1:9"
    with pytest.raises(UserError) as raised:
        check_reachable(uri)
    assert SECRET not in str(raised.value) and "http://***@127.0.0.1:9" in str(raised.value)

    setup_logging()
    with caplog.at_level(logging.INFO):
        logging.getLogger("rlhf.test").info("tracking at %s", uri)
        logging.info("kfp.local logs on the root logger: %s", uri)
    assert len(caplog.records) == 2 and all(SECRET not in r.getMessage() for r in caplog.records)

    config = ingest_feedback.Config(sources=["s3://bucket/inbox", uri])
    with step_run(run_context, "ingest_feedback", config) as run:
        run_id = run.info.run_id
    params = mlflow.MlflowClient().get_run(run_id).data.params
    assert SECRET not in "".join(params.values()) and "http://***@127.0.0.1:9" in params["sources"]


def test_trust_remote_code_is_announced_with_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = chat_models.build_checkpoint("llama3", tmp_path / "llama3")
    with caplog.at_level(logging.WARNING):
        load_policy(checkpoint, ModelStep())
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        load_policy(checkpoint, ModelStep(trust_remote_code=True))
    warned = [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert len(warned) == 1 and checkpoint in warned[0]
