"""Compile the DAG, run it locally with kfp.local, submit it to KFP, or schedule it as a recurring run."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

from rlhf_components.core import storage
from rlhf_components.core.config import flatten
from rlhf_components.core.errors import UserError, redacted
from rlhf_components.core.step import ERROR_FILE_ENV
from rlhf_components.core.storage import MODELS_PREFIX
from rlhf_components.core.tracking import check_reachable, resolve_tracking_uri
from rlhf_pipelines import interrupts
from rlhf_pipelines.config import PipelineConfig, with_absolute_paths

log = logging.getLogger(__name__)


def compile_pipeline(pipeline: str, output: str | Path, config: PipelineConfig | None = None) -> Path:
    """KFP IR YAML of the DAG `pipeline`; with a config, its tasks' pods get the config's `resources`."""
    from kfp import compiler

    from rlhf_pipelines import dag

    if pipeline not in dag.DAGS:
        raise UserError(f"unknown pipeline {pipeline!r}; available: {', '.join(sorted(dag.DAGS))}")
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(dag.build(pipeline, config.resources if config else None), str(path))
    return path


def build_demo_assets_if_configured(config: PipelineConfig) -> None:
    if config.demo_assets is None:
        return
    from rlhf_components.demo import build_demo_assets

    assets = build_demo_assets(config.demo_assets.dir, config.demo_assets.spec)
    log.info("demo assets ready in %s", assets.root)


def preflight(config: PipelineConfig) -> None:
    """Catch what would otherwise fail minutes into a run: unreachable servers, missing inputs."""
    from rlhf_components.core.models import resolve_checkpoint

    check_reachable(resolve_tracking_uri(config.tracking))
    if not config.policy.startswith(MODELS_PREFIX):
        resolve_checkpoint(config.policy)
    for source in config.collect_prompts.sources:
        if not storage.exists(source):
            raise UserError(f"collect_prompts.sources: {source} does not exist")


def run_local(
    config: PipelineConfig, workdir: Path, runner: Literal["subprocess", "docker"] = "subprocess"
) -> dict[str, Any]:
    """The whole DAG through kfp.local, each step a process of this Python environment (subprocess) or a
    container of the project image (docker, see rlhf_pipelines.containers); returns the summary."""
    import kfp.local

    from rlhf_pipelines import components, containers
    from rlhf_pipelines.dag import PIPELINES

    config = with_absolute_paths(config)
    pipeline_root = workdir / "kfp-local"
    error_file, run_file = pipeline_root / "last-step-error.txt", pipeline_root / "parent-run.json"
    inherited = {ERROR_FILE_ENV: str(error_file), **interrupts.runner_environment(run_file)}
    tracking_uri = resolve_tracking_uri(config.tracking)
    uri_in_config: str | None = tracking_uri
    if redacted(tracking_uri) != tracking_uri:
        # kfp.local prints every task's parameters: credentials travel in the environment instead.
        inherited["MLFLOW_TRACKING_URI"], uri_in_config = tracking_uri, None
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": uri_in_config})})
    pipeline_root.mkdir(parents=True, exist_ok=True)
    for stale in (error_file, run_file):
        stale.unlink(missing_ok=True)
    if runner == "docker":
        inherited.update(containers.engine_host())
    with _inherited_by_tasks(inherited):
        if runner == "docker":
            containers.check_engine_and_image(components.IMAGE)
            task_environment = {**_passed_to_containers(config), **inherited}
            local_runner: Any = containers.docker_runner(config, workdir, task_environment)
        else:
            local_runner = kfp.local.SubprocessRunner(use_venv=False)
        kfp.local.init(runner=local_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
        # Our components name the project image as base_image on purpose; under the subprocess runner it
        # is this environment.
        warnings.filterwarnings(
            "ignore", message="You may be attemping to run a task", category=RuntimeWarning
        )
        build_demo_assets_if_configured(config)
        preflight(config)
        try:
            kept = containers.exit_codes_kept() if runner == "docker" else nullcontext()
            with interrupts.stopped_cleanly(config.name, run_file), kept:
                task = PIPELINES[config.pipeline](config=config.to_json())
        except RuntimeError as error:
            reason = error_file.read_text(encoding="utf-8").strip() if error_file.is_file() else ""
            detail = reason or re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()[0]
            raise UserError(f"pipeline {config.name} failed at {detail} (step logs above)") from None
    outputs = json.loads(task.output)
    summary: dict[str, Any] = storage.read_json(outputs["summary"])
    return summary


def _passed_to_containers(config: PipelineConfig) -> dict[str, str]:
    """What a step reads from its environment besides the run's own variables: credentials, endpoints and
    settings of MLflow, S3, Hugging Face and ours, and the judge's API key."""
    prefixes = ("AWS_", "MLFLOW_", "HF_", "RLHF_")
    judge = config.evaluate.judge
    named = {judge.api_key_env} if judge is not None and judge.api_key_env else set()
    return {name: value for name, value in os.environ.items() if name.startswith(prefixes) or name in named}


@contextmanager
def _inherited_by_tasks(variables: dict[str, str]) -> Iterator[None]:
    """Environment variables for the task subprocesses, set for the length of the run."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_for_kubernetes(config: PipelineConfig) -> None:
    """Pods share nothing with this machine: every location must be a server or shared storage, and no
    secret may ride in the run's parameters, which the KFP UI shows to anyone who can see the run."""
    from rlhf_pipelines import components

    for field, value in flatten(config.model_dump(mode="json")).items():
        if redacted(value) != value:
            raise UserError(
                f"{field}: credentials in a URI would be visible in the KFP UI; put them in the "
                f"{components.MLFLOW_SECRET} or {components.S3_SECRET} secret (see README, Kubernetes)"
            )
    if config.tracking.uri is None or not config.tracking.uri.startswith(("http://", "https://")):
        raise UserError(
            "tracking.uri: a pipeline on Kubernetes needs an MLflow server URL (http:// or https://)"
        )
    shared = [("storage_root", config.storage_root)]
    shared += [("feedback_inbox", config.feedback_inbox)] if config.feedback_inbox else []
    shared += [(f"collect_prompts.sources[{i}]", s) for i, s in enumerate(config.collect_prompts.sources)]
    for name, uri in shared:
        if not storage.is_s3(uri):
            raise UserError(f"{name}: a pipeline on Kubernetes needs shared storage (s3://…), got {uri}")
    models = [("policy", config.policy), ("reward_model", config.reward_model)]
    for section, rewards in (
        ("grpo", config.grpo.rewards if config.grpo else []),
        ("evaluate", config.evaluate.rewards),
    ):
        models += [(f"{section}.rewards[{i}].reward_model", r.reward_model) for i, r in enumerate(rewards)]
    for name, model in models:
        if model is not None and not (storage.is_s3(model) or model.startswith(MODELS_PREFIX)):
            raise UserError(f"{name}: a pipeline on Kubernetes needs an s3:// or models:/ model, got {model}")
    if config.demo_assets is not None:
        raise UserError(
            "demo_assets: the demo assets are built on this machine; upload them and drop the section"
        )


@contextmanager
def _kfp_client(host: str) -> Iterator[Any]:
    """A kfp.Client whose failures, at connection or on any later call, are one-line UserErrors."""
    import urllib.error
    import urllib.request

    import kfp
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/apis/v2beta1/healthz", timeout=10):
            pass
    except (urllib.error.URLError, OSError) as error:
        raise UserError(f"KFP endpoint {host} is unreachable: {getattr(error, 'reason', error)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield kfp.Client(host=host)
    except ApiException as error:
        body = (error.body or "").strip().splitlines()
        detail = f": {body[0][:300]}" if body else ""
        raise UserError(f"KFP endpoint {host}: HTTP {error.status} {error.reason}{detail}") from None
    except HTTPError as error:
        raise UserError(f"KFP endpoint {host}: {error}") from None


def submit(config: PipelineConfig, host: str, experiment: str) -> str:
    _check_for_kubernetes(config)
    with tempfile.TemporaryDirectory() as temp, _kfp_client(host) as client:
        run = client.create_run_from_pipeline_package(
            str(compile_pipeline(config.pipeline, Path(temp) / "pipeline.yaml", config)),
            arguments={"config": config.to_json()},
            run_name=f"{config.name}-{config.config_hash()}",
            experiment_name=experiment,
            enable_caching=False,
        )
        return str(run.run_id)


def kfp_cron(expression: str) -> str:
    """KFP takes six cron fields, seconds first; a standard five-field expression gets seconds = 0."""
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise UserError(
        f"--cron {expression!r}: expected 6 fields (sec min hour day month weekday) or 5 standard ones"
    )


def schedule(config: PipelineConfig, host: str, cron: str, experiment: str, max_concurrency: int = 1) -> str:
    cron_expression = kfp_cron(cron)
    _check_for_kubernetes(config)
    with tempfile.TemporaryDirectory() as temp, _kfp_client(host) as client:
        found = client.create_experiment(name=experiment)
        recurring = client.create_recurring_run(
            experiment_id=found.experiment_id,
            job_name=f"{config.name}-retraining",
            description=f"recurring RLHF retraining of {config.name}",
            cron_expression=cron_expression,
            max_concurrency=max_concurrency,
            no_catchup=True,
            params={"config": config.to_json()},
            pipeline_package_path=str(
                compile_pipeline(config.pipeline, Path(temp) / f"{config.pipeline}.yaml", config)
            ),
            enable_caching=False,
        )
        return str(recurring.recurring_run_id)


def summary_table(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    win_rates = ("gold_win_rate", "rm_win_rate", "judge_win_rate", "reward_win_rate")
    keys = (*win_rates, "gold_score", "reference_gold_score", "reward_score", "reference_reward_score", "kl")
    for key in (*keys, "reward_model_accuracy", "promoted"):
        value = summary.get(key)
        if value is not None:  # what a run does not measure (DPO: no reward model) stays out
            rows.append((key, f"{value:.3f}" if isinstance(value, float) else str(value)))
    for role, entry in summary.get("registered", {}).items():
        rows.append(
            (f"registered {role}", f"{entry['name']} v{entry['version']} [{', '.join(entry['aliases'])}]")
        )
    return rows
