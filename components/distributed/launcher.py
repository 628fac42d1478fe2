"""Run a trainer step with N workers on an existing engine: in this process, under torchrun, as a Kubeflow
Trainer v2 TrainJob, or as a Training Operator v1 PyTorchJob. The step itself is unchanged: every worker runs
its standalone command line (`python -m rlhf_components.<step> --config job.yaml`), joins the process group
the engine set up, and rank 0 writes the outputs.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.step import WORKER_ERROR_DIR_ENV, step_output
from rlhf_components.core.tracking import RunContext
from rlhf_components.distributed.config import Distributed

log = logging.getLogger(__name__)

OutputsT = TypeVar("OutputsT", bound=BaseModel)


def launch(step: str, config: BaseModel, inputs: BaseModel, context: RunContext) -> Any:
    """Run `rlhf_components.<step>` as `config.launcher` says (in this process for steps without one);
    returns the step's Outputs."""
    module = importlib.import_module(f"rlhf_components.{step}")
    if not isinstance(config, Distributed):
        return module.run(config, inputs, context)
    if config.launcher == "local":
        if config.workers > 1:
            raise UserError(
                f"{step}.workers: {config.workers} workers need launcher torchrun, trainjob or pytorchjob, "
                "not local"
            )
        return module.run(config, inputs, context)
    job = {
        "context": {
            "tracking": {
                "uri": context.tracking_uri,
                "experiment": context.experiment,
                "retry_window_s": context.tracking_retry_window_s,
            },
            "output_root": context.output_root,
            "seed": context.seed,
            "parent_run_id": context.parent_run_id,
        },
        "inputs": inputs.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
    }
    if config.launcher == "torchrun":
        with tempfile.TemporaryDirectory(prefix=f"rlhf-{step}-") as temp:
            outputs = run_torchrun(step, job, config, Path(temp))
    else:
        from rlhf_components.distributed.kubernetes_job import run_job

        kind = importlib.import_module(f"rlhf_components.distributed.{config.launcher}").KIND
        outputs = run_job(kind, step, job, config, step_output(context, step, "distributed"))
    return module.Outputs.model_validate(outputs)


def run_torchrun(step: str, job: dict[str, Any], config: Distributed, folder: Path) -> Any:
    """N worker processes on this machine through torch.distributed.run; returns rank 0's outputs."""
    job_file, outputs_file, errors = folder / "job.yaml", folder / "outputs.json", folder / "errors"
    storage.write_json(str(job_file), job)  # JSON is YAML
    command = [
        *torchrun_command(config.workers),
        "-m",
        f"rlhf_components.{step}",
        "--config",
        str(job_file),
        "--outputs",
        str(outputs_file),
    ]
    log.info("%s: %d workers through torchrun", step, config.workers)
    run_workers(step, command, config.workers, errors)
    return storage.read_json(str(outputs_file))


def torchrun_command(workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous on a free local port: jobs on one machine do not collide
        f"--nproc-per-node={workers}",
        "--max-restarts=0",
    ]


def run_workers(step: str, command: list[str], workers: int, errors: Path) -> None:
    """Run a torchrun command line; a failure names the first failing worker and its reason."""
    env = {**os.environ, WORKER_ERROR_DIR_ENV: str(errors)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise UserError(worker_failure(step, workers, str(errors), result.returncode))


def worker_failure(step: str, workers: int, errors: str, returncode: int) -> str:
    """One line for a failed job: the worker that failed first, and why; else the exit code."""
    reasons = sorted(
        (report["time"], int(Path(uri).stem.removeprefix("rank-")), report["reason"])
        for uri in storage.list_files(errors)
        for report in [storage.read_json(uri)]
    )
    if not reasons:
        return f"{step}: distributed job failed (exit code {returncode}) and no worker left a reason"
    _, rank, reason = reasons[0]
    return f"{step}: worker {rank} of {workers} failed: {reason}"
