"""MLflow tracking: one parent run per pipeline run, one child run per step.

With no tracking URI configured (and no MLFLOW_TRACKING_URI), runs go to a `sqlite:///` store in the
working directory, so the embedded default needs no server.
"""

from __future__ import annotations

import base64
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from rlhf_components.core.config import StrictModel, flatten
from rlhf_components.core.errors import UserError, redacted
from rlhf_components.core.runtime import process_rank

log = logging.getLogger(__name__)

DEFAULT_STORE_NAME = "mlflow.db"


class TrackingConfig(StrictModel):
    uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite:///./mlflow.db")
    experiment: str = Field(default="rlhf-pipelines", min_length=1)


class RunContext(StrictModel):
    """What every step needs to know about the pipeline run it belongs to."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    output_root: str = Field(description="where this pipeline run's step outputs go (local dir or s3://)")
    seed: int = 0


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


def _use(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` and the experiment (created if missing); returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return str(mlflow.set_experiment(experiment).experiment_id)


def start_pipeline_run(
    config: TrackingConfig, run_name: str, params: dict[str, Any], tags: dict[str, str]
) -> tuple[str, str]:
    """Create the parent run (left open for the steps); returns (tracking URI, run id)."""
    import mlflow

    uri = resolve_tracking_uri(config)
    check_reachable(uri)
    experiment_id = _use(uri, config.experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags={"rlhf.kind": "pipeline", **tags})
    log_params(run.info.run_id, flatten(params))
    return uri, run.info.run_id


def log_params(run_id: str, params: dict[str, str]) -> None:
    import mlflow
    from mlflow.entities import Param

    items = [Param(key, redacted(value)[:6000]) for key, value in sorted(params.items())]
    client = mlflow.MlflowClient()
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def finish_pipeline_run(context: RunContext, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.set_tracking_uri(context.tracking_uri)
    mlflow.MlflowClient().set_terminated(context.parent_run_id, status=status)


@contextmanager
def step_run(context: RunContext, step: str, config: StrictModel) -> Iterator[Any]:
    """A child run of the pipeline run, with the step's config as params; failed steps are marked FAILED.

    Only the main worker of a distributed step records anything (here and in `log_metrics`): the others
    hand it their numbers through the collectives, and MLflow sees one run per step.
    """
    import mlflow

    if process_rank() != 0:
        yield None
        return
    check_reachable(context.tracking_uri)
    _use(context.tracking_uri, context.experiment)
    with mlflow.start_run(
        run_name=step, parent_run_id=context.parent_run_id, tags={"rlhf.step": step}
    ) as run:
        params = flatten(config.model_dump(mode="json"))
        if params:
            log_params(run.info.run_id, params)
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    if process_rank() != 0:
        return
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)


def log_dict(data: Any, artifact_file: str) -> None:
    """A JSON artifact of the step's run (rank 0 only, like metrics)."""
    import mlflow

    if process_rank() == 0:
        mlflow.log_dict(data, artifact_file)
