"""What each KFP component calls: parse the pipeline config, pick the step's section, run the step.

Each function takes and returns JSON strings (KFP parameters), so the component bodies stay one line and
hold no logic of their own. `start` opens the MLflow parent run and builds the `RunContext` once; every
later task receives it in start's output. Upstream outputs arrive as the JSON of the producing step's
Outputs model and are parsed with that model (the annotations of each function below), every step runs
through `launch` (in this process, or on the workers its config asks for), and its outputs leave as JSON. A
step that fails marks the pipeline's MLflow parent run FAILED, and leaves its one-line reason where
`rlhf run` can show it (RLHF_ERROR_FILE).
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from rlhf_components import (
    collect_prompts,
    dpo,
    evaluate,
    generate_candidates,
    grpo,
    ingest_feedback,
    ppo,
    register_and_promote,
    train_reward_model,
)
from rlhf_components.core.config import StrictModel
from rlhf_components.core.runtime import setup_logging
from rlhf_components.core.step import ERROR_FILE_ENV
from rlhf_components.core.tracking import (
    RunContext,
    experiment_of,
    finish_pipeline_run,
    start_pipeline_run,
)
from rlhf_components.distributed import launch
from rlhf_components.register_and_promote.registry import alias_version
from rlhf_pipelines import interrupts
from rlhf_pipelines.config import PipelineConfig, parse_pipeline_config

StepBody = Callable[..., str]


class Started(StrictModel):
    """start_run's output: where every step records and writes, and the policy this run starts from."""

    context: RunContext
    champion: str
    champion_version: str | None


def _report_failure(step: str, error: BaseException) -> str:
    """The failure's one line, also left for `rlhf run` to print when it runs the step."""
    message = str(error).removeprefix(f"{step}: ")
    target = os.environ.get(ERROR_FILE_ENV)
    if target:
        Path(target).write_text(f"step {step}: {message}\n", encoding="utf-8")
    return message


def start(config_json: str) -> str:
    """Open the MLflow parent run; name the champion policy (production alias, else the SFT policy)."""
    setup_logging()
    interrupts.stop_with_the_runner()
    config = parse_pipeline_config(config_json)
    try:
        tracking_uri, run_id = start_pipeline_run(
            config.tracking,
            config.name,
            config.model_dump(mode="json"),
            {"rlhf.pipeline": config.name, "rlhf.config_hash": config.config_hash()},
        )
        interrupts.record_parent_run(tracking_uri, run_id)
        name = config.register_and_promote.policy_name
        version = alias_version(name, "production")
    except Exception as error:
        _report_failure("start_run", error)
        raise
    context = RunContext(
        tracking_uri=tracking_uri,
        experiment=experiment_of(tracking_uri, run_id),  # KFP's, when KFP made the run
        parent_run_id=run_id,
        output_root=config.storage_root,
        seed=config.seed,
        tracking_retry_window_s=config.tracking.retry_window_s,
    )
    champion = f"models:/{name}@production" if version else config.policy
    return Started(context=context, champion=champion, champion_version=version).model_dump_json()


def _step(finishes_pipeline: bool = False) -> Callable[[Callable[..., BaseModel]], StepBody]:
    """Turn `run_<step>(config, started, *upstream) -> the step's Inputs` into the component's body:
    (config JSON, start's output, upstream outputs' JSON…) → the step's outputs as JSON."""

    def decorate(inputs_for: Callable[..., BaseModel]) -> StepBody:
        step = inputs_for.__name__.removeprefix("run_")
        hints = typing.get_type_hints(inputs_for)
        upstream_types = [hints[name] for name in list(hints)[2:-1]]  # after config and started; not return

        @functools.wraps(inputs_for)
        def body(config_json: str, started_json: str, *upstream_json: str) -> str:
            setup_logging()
            interrupts.stop_with_the_runner()
            config = parse_pipeline_config(config_json)
            started = Started.model_validate_json(started_json)
            try:
                upstream = [
                    TypeAdapter(kind).validate_json(text)
                    for kind, text in zip(upstream_types, upstream_json, strict=True)
                ]
                inputs = inputs_for(config, started, *upstream)
                outputs = launch(step, getattr(config, step), inputs, started.context)
            except BaseException as error:
                with interrupts.sigint_ignored():  # a second interrupt must not cut the record short
                    if not isinstance(error, Exception) or interrupts.runner_gone():
                        finish_pipeline_run(started.context, "KILLED")
                    else:
                        failure = (step, _report_failure(step, error))
                        finish_pipeline_run(started.context, "FAILED", failure)
                raise
            if finishes_pipeline:
                finish_pipeline_run(started.context)
            return str(outputs.model_dump_json())

        return body

    return decorate


@_step()
def run_collect_prompts(config: PipelineConfig, started: Started) -> collect_prompts.Inputs:
    return collect_prompts.Inputs()


@_step()
def run_generate_candidates(
    config: PipelineConfig, started: Started, prompts: collect_prompts.Outputs
) -> generate_candidates.Inputs:
    return generate_candidates.Inputs(policy=started.champion, prompts=prompts.train, inbox=config.inbox)


@_step()
def run_ingest_feedback(
    config: PipelineConfig, started: Started, candidates: generate_candidates.Outputs
) -> ingest_feedback.Inputs:
    return ingest_feedback.Inputs(inbox=config.inbox, tasks=candidates.tasks)


@_step()
def run_train_reward_model(
    config: PipelineConfig, started: Started, feedback: ingest_feedback.Outputs
) -> train_reward_model.Inputs:
    return train_reward_model.Inputs(
        base_model=config.policy, pretrained=config.reward_model, train=feedback.train, eval=feedback.eval
    )


@_step()
def run_ppo(
    config: PipelineConfig,
    started: Started,
    prompts: collect_prompts.Outputs,
    reward: train_reward_model.Outputs,
) -> ppo.Inputs:
    return ppo.Inputs(policy=config.policy, reward_model=reward.reward_model, prompts=prompts.train)


@_step()
def run_dpo(config: PipelineConfig, started: Started, feedback: ingest_feedback.Outputs) -> dpo.Inputs:
    return dpo.Inputs(policy=config.policy, train=feedback.train, eval=feedback.eval)


@_step()
def run_grpo(
    config: PipelineConfig,
    started: Started,
    prompts: collect_prompts.Outputs,
    reward: train_reward_model.Outputs | None,
) -> grpo.Inputs:
    return grpo.Inputs(
        policy=config.policy, prompts=prompts.train, reward_model=reward.reward_model if reward else None
    )


@_step()
def run_evaluate(
    config: PipelineConfig,
    started: Started,
    prompts: collect_prompts.Outputs,
    reward: train_reward_model.Outputs | None,
    policy: ppo.Outputs | dpo.Outputs | grpo.Outputs,
) -> evaluate.Inputs:
    return evaluate.Inputs(
        candidate=policy.policy,
        reference=config.policy,
        champion=started.champion if started.champion != config.policy else None,
        reward_model=reward.reward_model if reward else None,
        prompts=prompts.eval,
    )


@_step(finishes_pipeline=True)
def run_register_and_promote(
    config: PipelineConfig,
    started: Started,
    prompts: collect_prompts.Outputs,
    feedback: ingest_feedback.Outputs | None,
    reward: train_reward_model.Outputs | None,
    policy: ppo.Outputs | dpo.Outputs | grpo.Outputs,
    evaluation: evaluate.Outputs,
) -> register_and_promote.Inputs:
    return register_and_promote.Inputs(
        policy=policy.policy,
        policy_adapter=policy.policy_adapter,
        reward_model=reward.reward_model if reward else None,
        reward_model_adapter=reward.adapter if reward else None,
        evaluation=evaluation.metrics,
        reward_model_accuracy=reward.eval_accuracy if reward else None,
        lineage={
            "prompts_hash": prompts.content_hash,
            "config_hash": config.config_hash(),
            "base_policy": config.policy,
        }
        | ({"feedback_hash": feedback.content_hash} if feedback else {}),
        parent_version=started.champion_version,
    )
