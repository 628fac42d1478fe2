"""MLflow tracking: one parent run per pipeline run, one child run per step.

With no tracking URI configured (and no MLFLOW_TRACKING_URI), runs go to a `sqlite:///` store in the
working directory, so the embedded default needs no server.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pydantic import Field

from rlhf_components.core.config import StrictModel, flatten
from rlhf_components.core.errors import UserError, redacted
from rlhf_components.core.runtime import process_rank

log = logging.getLogger(__name__)

DEFAULT_STORE_NAME = "mlflow.db"


RETRY_WINDOW_S = 60.0
RETRY_WINDOW_FIELD = Field(
    default=RETRY_WINDOW_S,
    ge=0.0,
    le=1000.0,
    description="how long MLflow calls retry, with backoff, a tracking server that does not answer before "
    "the step fails with one line (a connection that hangs also waits MLFLOW_HTTP_REQUEST_TIMEOUT, 120 s, "
    "per attempt)",
)


class TrackingConfig(StrictModel):
    uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite:///./mlflow.db")
    experiment: str = Field(default="rlhf-pipelines", min_length=1)
    retry_window_s: float = RETRY_WINDOW_FIELD


class RunContext(StrictModel):
    """What every step needs to know about the pipeline run it belongs to."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    output_root: str = Field(description="where this pipeline run's step outputs go (local dir or s3://)")
    seed: int = 0
    tracking_retry_window_s: float = RETRY_WINDOW_FIELD


class TrackingServerDown(UserError):
    """The tracking server did not answer within the retry window."""


def resolve_tracking_uri(config: TrackingConfig) -> str:
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / DEFAULT_STORE_NAME}"
    return uri


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when a tracking server is down, instead of minutes of retries later."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(_health_request(uri), timeout=5) as response:
            if response.status != 200:
                raise UserError(f"MLflow tracking server {uri} answered HTTP {response.status} on /health")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(f"MLflow tracking server {uri} is unreachable: {reason}") from None


def _health_request(uri: str) -> urllib.request.Request:
    """GET /health; credentials in the URI (urllib cannot take them there) become a basic-auth header."""
    parts = urllib.parse.urlsplit(uri)
    url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
    if parts.username is None:
        return urllib.request.Request(url)
    user, password = (urllib.parse.unquote(part or "") for part in (parts.username, parts.password))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})


def _use(uri: str, experiment: str, retry_window_s: float) -> str:
    """Point MLflow at `uri` and the experiment (created if missing); returns the experiment id."""
    import mlflow

    _bound_retries(retry_window_s)
    mlflow.set_tracking_uri(uri)
    with server_answers():
        return str(mlflow.set_experiment(experiment).experiment_id)


_WINDOW_ENV = "RLHF_TRACKING_RETRY_WINDOW_S"  # for the one-line error


def _bound_retries(window_s: float) -> None:
    """MLflow retries a failed request with exponential backoff, sleeping 0, 2, 4, 8… s at backoff factor 1:
    k retries take 2^k - 2 s, so as many as fill `window_s` (MLflow's own default waits minutes)."""
    retries = 0 if window_s <= 0 else math.ceil(math.log2(window_s + 2))
    os.environ.update(
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        }
    )
    os.environ[_WINDOW_ENV] = f"{window_s:g}"


@contextmanager
def server_answers() -> Iterator[None]:
    """MLflow calls inside: a tracking server that stays unreachable past the retry window ends in one line,
    and every later MLflow call of this process (on the way out) fails at once instead of retrying again."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        cause = error.__context__
        if not isinstance(cause, requests.exceptions.RequestException):
            raise
        import mlflow

        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        window = os.environ.get(_WINDOW_ENV, "?")
        raise TrackingServerDown(
            f"MLflow tracking server {mlflow.get_tracking_uri()} did not answer for {window} s "
            f"({_why(cause)}); tracking.retry_window_s sets how long to wait"
        ) from None


def _why(cause: Exception) -> str:
    """The innermost reason of a requests failure: 'Connection refused', 'Read timed out', 'HTTP 503'."""
    text = str(cause)
    for pattern in (
        r"\[Errno -?\d+\] ([^'\")]+)",
        r"(Read timed out|Connect timeout|timed out)",
        r"too many (\d{3}) error responses",
    ):
        found = re.search(pattern, text)
        if found:
            return f"HTTP {found.group(1)}" if found.group(1).isdigit() else found.group(1).strip()
    return type(cause).__name__


CODE_VERSION_ENV = "RLHF_GIT_SHA"
FAILED_STEP_TAG, FAILURE_TAG = "rlhf.failed_step", "rlhf.failure"


def code_version(source: Path = Path(__file__)) -> str:
    """The commit this code was built from: RLHF_GIT_SHA (set in the image by `make images`), else the git
    checkout the package runs from (an editable install), `-dirty` with uncommitted changes; else unknown."""
    built = os.environ.get(CODE_VERSION_ENV)
    if built:
        return built
    try:
        described = subprocess.run(
            ["git", "-C", str(source.parent), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 else "unknown"


def start_pipeline_run(
    config: TrackingConfig, run_name: str, params: dict[str, Any], tags: dict[str, str]
) -> tuple[str, str]:
    """Create the parent run (left open for the steps); returns (tracking URI, run id). Under KFP's MLflow
    integration, which made a run for the pipeline and one nested in it for this task (MLFLOW_RUN_ID),
    the pipeline's run is KFP's: it gets our params and tags, and no second one is made."""
    import mlflow

    uri = resolve_tracking_uri(config)
    _bound_retries(config.retry_window_s)
    tags = {"rlhf.kind": "pipeline", "rlhf.git_sha": code_version(), **tags}
    with server_answers():
        client = mlflow.MlflowClient(uri)
        injected = _injected_run(client)
        if injected is None:
            experiment_id = _use(uri, config.experiment, config.retry_window_s)
            run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        else:
            run_id = injected.data.tags.get(PARENT_RUN_TAG, injected.info.run_id)
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
        mlflow.set_tracking_uri(uri)
        log_params(run_id, flatten(params))
    return uri, run_id


def experiment_of(tracking_uri: str, run_id: str) -> str:
    """The name of the experiment a run is in (KFP's, for a run KFP made)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    with server_answers():
        return str(client.get_experiment(client.get_run(run_id).info.experiment_id).name)


PARENT_RUN_TAG = "mlflow.parentRunId"
KFP_TASK_RUN_ENV = "MLFLOW_RUN_ID"


def _injected_run(client: Any) -> Any:
    """The run KFP's MLflow integration made for this task (MLFLOW_RUN_ID), when it is on our server."""
    from mlflow.exceptions import MlflowException

    run_id = os.environ.get(KFP_TASK_RUN_ENV)
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        log.warning("%s=%s is not a run of %s (%s); recording in runs of our own", KFP_TASK_RUN_ENV, run_id,
                    redacted(client.tracking_uri), error)  # fmt: skip
        return None


def log_params(run_id: str, params: dict[str, str]) -> None:
    import mlflow
    from mlflow.entities import Param

    items = [Param(key, redacted(value)[:6000]) for key, value in sorted(params.items())]
    client = mlflow.MlflowClient()
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def finish_pipeline_run(
    context: RunContext, status: str = "FINISHED", failure: tuple[str, str] | None = None
) -> None:
    """End the pipeline run; a failed one carries the failing step and its reason as tags."""
    import mlflow

    _bound_retries(context.tracking_retry_window_s)
    mlflow.set_tracking_uri(context.tracking_uri)
    with server_answers():
        client = mlflow.MlflowClient()
        if failure is not None:
            step, reason = failure
            client.set_tag(context.parent_run_id, FAILED_STEP_TAG, step)
            client.set_tag(context.parent_run_id, FAILURE_TAG, redacted(reason)[:5000])
        client.set_terminated(context.parent_run_id, status=status)


@contextmanager
def step_run(context: RunContext, step: str, config: StrictModel) -> Iterator[Any]:
    """A child run of the pipeline run, with the step's config as params; failed steps are marked FAILED.
    Under KFP's MLflow integration it is the run KFP made for the task (MLFLOW_RUN_ID), not a second one.

    Only the main worker of a distributed step records anything (here and in `log_metrics`): the others
    hand it their numbers through the collectives, and MLflow sees one run per step.
    """
    import mlflow

    if process_rank() != 0:
        yield None
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags

    experiment_id = _use(context.tracking_uri, context.experiment, context.tracking_retry_window_s)
    with server_answers():
        client = mlflow.MlflowClient()
        injected = _injected_run(client)
        if injected is not None and injected.data.tags.get(PARENT_RUN_TAG) == context.parent_run_id:
            run_id = injected.info.run_id  # KFP's run for this task, nested in the pipeline's
        else:
            tags = resolve_tags({"rlhf.step": step, PARENT_RUN_TAG: context.parent_run_id})
            run_id = client.create_run(experiment_id, run_name=step, tags=tags).info.run_id
        run = mlflow.start_run(run_id=run_id, tags={"rlhf.step": step})
    try:
        with server_answers():
            params = flatten(config.model_dump(mode="json"))
            if params:
                log_params(run.info.run_id, params)
        yield run
    except BaseException:
        # Best effort: a tracking server that is down cannot hear it, and the step's own error says more.
        with suppress(MlflowException):
            mlflow.end_run("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    with server_answers():
        mlflow.end_run()


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    if process_rank() != 0:
        return
    with server_answers():
        mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_dict(data: Any, artifact_file: str) -> None:
    """A JSON artifact of the step's run (rank 0 only, like metrics)."""
    import mlflow

    if process_rank() == 0:
        mlflow.log_dict(data, artifact_file)
