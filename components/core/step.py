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
import sys
from collections.abc import Callable
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel, load_yaml_config
from rlhf_components.core.errors import UserError
from rlhf_components.core.runtime import setup_logging
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
    """`python -m rlhf_components.<step> --config job.yaml`: prints the outputs as JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m rlhf_components.{step}")
    parser.add_argument("--config", required=True, help="job YAML with context, inputs and config sections")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        job = load_yaml_config(StandaloneJob[config_type, inputs_type], args.config)  # type: ignore[valid-type]
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
    print(json.dumps(outputs.model_dump(mode="json"), indent=2))
    return 0
