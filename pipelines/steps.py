"""What each KFP component calls: parse the pipeline config, pick the step's section, run the step.

Each function takes and returns JSON strings (KFP parameters), so the component bodies stay one line and
hold no logic of their own. Step outputs flow between tasks as the JSON of the step's Outputs model. A step
that fails marks the pipeline's MLflow parent run FAILED, and leaves its one-line reason where `rlhf run`
can show it (RLHF_ERROR_FILE).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_components import (
    collect_prompts,
    dpo,
    evaluate,
    generate_candidates,
    ingest_feedback,
    ppo,
    register_and_promote,
    train_reward_model,
)
from rlhf_components.collect_prompts.step import run as collect_prompts_run
from rlhf_components.core.runtime import setup_logging
from rlhf_components.core.step import ERROR_FILE_ENV
from rlhf_components.core.tracking import (
    RunContext,
    finish_pipeline_run,
    resolve_tracking_uri,
    start_pipeline_run,
)
from rlhf_components.distributed import launch
from rlhf_components.evaluate.step import run as evaluate_run
from rlhf_components.generate_candidates.step import run as generate_candidates_run
from rlhf_components.ingest_feedback.step import run as ingest_feedback_run
from rlhf_components.register_and_promote.registry import alias_version
from rlhf_components.register_and_promote.step import run as register_and_promote_run
from rlhf_pipelines.config import PipelineConfig, parse_pipeline_config

StepBody = Callable[..., str]


def _context(config: PipelineConfig, run_id: str) -> RunContext:
    return RunContext(
        tracking_uri=resolve_tracking_uri(config.tracking),
        experiment=config.tracking.experiment,
        parent_run_id=run_id,
        output_root=config.storage_root,
        seed=config.seed,
    )


def _report_failure(step: str, error: Exception) -> None:
    target = os.environ.get(ERROR_FILE_ENV)
    if target:
        message = str(error).removeprefix(f"{step}: ")
        Path(target).write_text(f"step {step}: {message}\n", encoding="utf-8")


def start(config_json: str) -> str:
    """Open the MLflow parent run; name the champion policy (production alias, else the SFT policy)."""
    setup_logging()
    config = parse_pipeline_config(config_json)
    try:
        _, run_id = start_pipeline_run(
            config.tracking,
            config.name,
            config.model_dump(mode="json"),
            {"rlhf.pipeline": config.name, "rlhf.config_hash": config.config_hash()},
        )
        name = config.register_and_promote.policy_name
        version = alias_version(name, "production")
    except Exception as error:
        _report_failure("start_run", error)
        raise
    champion = f"models:/{name}@production" if version else config.policy
    return json.dumps({"run_id": run_id, "champion": champion, "champion_version": version})


def _step(body: Callable[..., str]) -> StepBody:
    """(config JSON, start_run's output, upstream outputs…) → body(config, started, context, *upstream)."""

    @functools.wraps(body)
    def wrapper(config_json: str, run: str, *upstream: str) -> str:
        setup_logging()
        config = parse_pipeline_config(config_json)
        started: dict[str, Any] = json.loads(run)
        context = _context(config, started["run_id"])
        try:
            return body(config, started, context, *(json.loads(u) for u in upstream))
        except Exception as error:
            _report_failure(body.__name__.removeprefix("run_"), error)
            finish_pipeline_run(context, "FAILED")
            raise

    return wrapper


@_step
def run_collect_prompts(config: PipelineConfig, started: dict[str, Any], context: RunContext) -> str:
    return collect_prompts_run(config.collect_prompts, collect_prompts.Inputs(), context).model_dump_json()


@_step
def run_generate_candidates(
    config: PipelineConfig, started: dict[str, Any], context: RunContext, prompts: dict[str, Any]
) -> str:
    inputs = generate_candidates.Inputs(
        policy=started["champion"], prompts=prompts["train"], inbox=config.feedback_inbox
    )
    return generate_candidates_run(config.generate_candidates, inputs, context).model_dump_json()


@_step
def run_ingest_feedback(
    config: PipelineConfig, started: dict[str, Any], context: RunContext, candidates: dict[str, Any]
) -> str:
    inputs = ingest_feedback.Inputs(inbox=config.feedback_inbox, tasks=candidates["tasks"])
    return ingest_feedback_run(config.ingest_feedback, inputs, context).model_dump_json()


@_step
def run_train_reward_model(
    config: PipelineConfig, started: dict[str, Any], context: RunContext, feedback: dict[str, Any]
) -> str:
    inputs = train_reward_model.Inputs(
        base_model=config.policy, train=feedback["train"], eval=feedback["eval"]
    )
    return str(launch("train_reward_model", config.train_reward_model, inputs, context).model_dump_json())


@_step
def run_ppo(
    config: PipelineConfig,
    started: dict[str, Any],
    context: RunContext,
    prompts: dict[str, Any],
    reward: dict[str, Any],
) -> str:
    inputs = ppo.Inputs(policy=config.policy, reward_model=reward["reward_model"], prompts=prompts["train"])
    return str(launch("ppo", config.ppo, inputs, context).model_dump_json())


@_step
def run_dpo(
    config: PipelineConfig, started: dict[str, Any], context: RunContext, feedback: dict[str, Any]
) -> str:
    inputs = dpo.Inputs(policy=config.policy, train=feedback["train"], eval=feedback["eval"])
    return str(launch("dpo", config.dpo, inputs, context).model_dump_json())


@_step
def run_evaluate(
    config: PipelineConfig,
    started: dict[str, Any],
    context: RunContext,
    prompts: dict[str, Any],
    reward: dict[str, Any],
    policy: dict[str, Any],
) -> str:
    champion = started["champion"]
    inputs = evaluate.Inputs(
        candidate=policy["policy"],
        reference=config.policy,
        champion=champion if champion != config.policy else None,
        reward_model=reward["reward_model"] if reward else None,
        prompts=prompts["eval"],
    )
    return evaluate_run(config.evaluate, inputs, context).model_dump_json()


@_step
def run_register_and_promote(
    config: PipelineConfig,
    started: dict[str, Any],
    context: RunContext,
    prompts: dict[str, Any],
    feedback: dict[str, Any],
    reward: dict[str, Any] | None,
    policy: dict[str, Any],
    evaluation: dict[str, Any],
) -> str:
    inputs = register_and_promote.Inputs(
        policy=policy["policy"],
        reward_model=reward["reward_model"] if reward else None,
        evaluation=evaluation["metrics"],
        reward_model_accuracy=reward["eval_accuracy"] if reward else None,
        lineage={
            "prompts_hash": prompts["content_hash"],
            "feedback_hash": feedback["content_hash"],
            "config_hash": config.config_hash(),
            "base_policy": config.policy,
        },
        parent_version=started["champion_version"],
    )
    outputs = register_and_promote_run(config.register_and_promote, inputs, context)
    finish_pipeline_run(context)
    return outputs.model_dump_json()
