"""What every step shares: its run context, and the standalone command line.

A step is `run(config, inputs, context) -> outputs`, all pydantic models. Standalone, a step reads a job file:

    context: {tracking: {uri: ..., experiment: ...}, output_root: ./out, seed: 0}
    inputs: {...}      # the step's Inputs model
    config: {...}      # the step's Config model (the same section as in a pipeline config)

and runs under a fresh MLflow parent run unless `context.parent_run_id` names one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel, load_yaml_config
from rlhf_components.core.errors import UserError
from rlhf_components.core.runtime import process_rank, setup_logging
from rlhf_components.core.tracking import (
    RunContext,
    TrackingConfig,
    finish_pipeline_run,
    resolve_tracking_uri,
    start_pipeline_run,
)

ConfigT = TypeVar("ConfigT", bound=BaseModel)
InputsT = TypeVar("InputsT", bound=BaseModel)
OutputsT = TypeVar("OutputsT", bound=BaseModel)

log = logging.getLogger(__name__)

# Where a failing pipeline task leaves its one-line reason for `rlhf run` (unset on Kubernetes).
ERROR_FILE_ENV = "RLHF_ERROR_FILE"
# Where each distributed worker leaves its reason (rank-<r>.json) for the launcher (local dir or s3://).
WORKER_ERROR_DIR_ENV = "RLHF_WORKER_ERROR_DIR"


@contextmanager
def recorded_errors() -> Iterator[None]:
    """Leave this worker's failure where the launcher looks for it, then let it propagate."""
    try:
        yield
    except Exception as error:
        directory = os.environ.get(WORKER_ERROR_DIR_ENV)
        if directory:
            reason = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            rank = process_rank()
            # The time tells the launcher which failure came first: the cause, not its echoes on other ranks.
            storage.write_json(
                storage.join(directory, f"rank-{rank}.json"), {"time": time.time(), "reason": reason}
            )
        raise


def step_output(context: RunContext, step: str, *parts: str) -> str:
    return storage.join(context.output_root, context.parent_run_id, step, *parts)


class StandaloneContext(StrictModel):
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_root: str = "./rlhf-outputs"
    seed: int = 0
    parent_run_id: str | None = None


class StandaloneJob(StrictModel, Generic[ConfigT, InputsT]):
    context: StandaloneContext = Field(default_factory=StandaloneContext)
    inputs: InputsT
    config: ConfigT


def run_standalone(
    step: str,
    config_type: type[ConfigT],
    inputs_type: type[InputsT],
    run: Callable[[ConfigT, InputsT, RunContext], OutputsT],
    argv: list[str] | None = None,
) -> int:
    """`python -m rlhf_components.<step> --config job.yaml [--outputs URI]`: prints the outputs as JSON.

    The job file may be local or s3://. Under torchrun or a PyTorchJob every worker runs this; rank 0 writes
    the outputs to `--outputs`, and each failing worker leaves its reason in $RLHF_WORKER_ERROR_DIR.
    """
    parser = argparse.ArgumentParser(prog=f"python -m rlhf_components.{step}")
    parser.add_argument("--config", required=True, help="job YAML (local or s3://)")
    parser.add_argument("--outputs", default=None, help="also write the outputs JSON here (local or s3://)")
    args = parser.parse_args(argv)
    setup_logging()
    with recorded_errors():
        try:
            job = _load_job(StandaloneJob[config_type, inputs_type], args.config)  # type: ignore[valid-type]
            parent_run_id = job.context.parent_run_id
            tracking_uri = resolve_tracking_uri(job.context.tracking)
            if parent_run_id is None:
                tracking_uri, parent_run_id = start_pipeline_run(
                    job.context.tracking, f"standalone-{step}", {}, {"rlhf.standalone_step": step}
                )
            context = RunContext(
                tracking_uri=tracking_uri,
                experiment=job.context.tracking.experiment,
                parent_run_id=parent_run_id,
                output_root=job.context.output_root,
                seed=job.context.seed,
                tracking_retry_window_s=job.context.tracking.retry_window_s,
            )
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        owns_parent_run = job.context.parent_run_id is None
        try:
            outputs = run(job.config, job.inputs, context)
        except UserError as error:
            if owns_parent_run:
                finish_pipeline_run(context, "FAILED")
            print(f"error: {error}", file=sys.stderr)
            return 2
    if owns_parent_run:
        finish_pipeline_run(context)
    result = outputs.model_dump(mode="json")
    if args.outputs and process_rank() == 0:
        storage.write_json(args.outputs, result)
    print(json.dumps(result, indent=2))
    return 0


def _load_job(model: type[ConfigT], uri: str) -> ConfigT:
    if not storage.is_s3(uri):
        return load_yaml_config(model, uri)
    with tempfile.TemporaryDirectory() as temp:
        local = Path(temp, "job.yaml")
        local.write_bytes(storage.read_bytes(uri))
        return load_yaml_config(model, local)
