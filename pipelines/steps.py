"""What each KFP component calls: parse the pipeline config, pick the step's section, run the step.

Each function takes and returns JSON strings (KFP parameters), so the component bodies stay one line and
hold no logic of their own. Step outputs flow between tasks as the JSON of the step's Outputs model.
"""

from __future__ import annotations

import json

from rlhf_components import (
    collect_prompts,
    evaluate,
    generate_candidates,
    ingest_feedback,
    ppo,
    register_and_promote,
    train_reward_model,
)
from rlhf_components.core.runtime import setup_logging
from rlhf_components.core.tracking import (
    RunContext,
    finish_pipeline_run,
    resolve_tracking_uri,
    start_pipeline_run,
)
from rlhf_components.register_and_promote.registry import alias_version
from rlhf_pipelines.config import PipelineConfig, parse_pipeline_config


def _context(config: PipelineConfig, run_id: str) -> RunContext:
    return RunContext(
        tracking_uri=resolve_tracking_uri(config.tracking),
        experiment=config.tracking.experiment,
        parent_run_id=run_id,
        output_root=config.storage_root,
        seed=config.seed,
    )


def start(config_json: str) -> str:
    """Open the MLflow parent run; name the champion policy (production alias, else the SFT policy)."""
    setup_logging()
    config = parse_pipeline_config(config_json)
    _, run_id = start_pipeline_run(
        config.tracking,
        config.name,
        config.model_dump(mode="json"),
        {"rlhf.pipeline": config.name, "rlhf.config_hash": config.config_hash()},
    )
    name = config.register_and_promote.policy_name
    version = alias_version(name, "production")
    champion = f"models:/{name}@production" if version else config.policy
    return json.dumps({"run_id": run_id, "champion": champion, "champion_version": version})


def _run_id(run: str) -> str:
    return str(json.loads(run)["run_id"])


def run_collect_prompts(config_json: str, run: str) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    outputs = collect_prompts.run(
        config.collect_prompts, collect_prompts.Inputs(), _context(config, _run_id(run))
    )
    return outputs.model_dump_json()


def run_generate_candidates(config_json: str, run: str, prompts: str) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    inputs = generate_candidates.Inputs(
        policy=json.loads(run)["champion"], prompts=json.loads(prompts)["train"], inbox=config.feedback_inbox
    )
    outputs = generate_candidates.run(config.generate_candidates, inputs, _context(config, _run_id(run)))
    return outputs.model_dump_json()


def run_ingest_feedback(config_json: str, run: str, candidates: str) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    inputs = ingest_feedback.Inputs(inbox=config.feedback_inbox, tasks=json.loads(candidates)["tasks"])
    outputs = ingest_feedback.run(config.ingest_feedback, inputs, _context(config, _run_id(run)))
    return outputs.model_dump_json()


def run_train_reward_model(config_json: str, run: str, feedback: str) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    dataset = json.loads(feedback)
    inputs = train_reward_model.Inputs(base_model=config.policy, train=dataset["train"], eval=dataset["eval"])
    outputs = train_reward_model.run(config.train_reward_model, inputs, _context(config, _run_id(run)))
    return outputs.model_dump_json()


def run_ppo(config_json: str, run: str, prompts: str, reward: str) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    inputs = ppo.Inputs(
        policy=config.policy,
        reward_model=json.loads(reward)["reward_model"],
        prompts=json.loads(prompts)["train"],
    )
    outputs = ppo.run(config.ppo, inputs, _context(config, _run_id(run)))
    return outputs.model_dump_json()


def run_evaluate(config_json: str, run: str, prompts: str, reward: str, policy: str) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    champion = json.loads(run)["champion"]
    inputs = evaluate.Inputs(
        candidate=json.loads(policy)["policy"],
        reference=config.policy,
        champion=champion if champion != config.policy else None,
        reward_model=json.loads(reward)["reward_model"],
        prompts=json.loads(prompts)["eval"],
    )
    outputs = evaluate.run(config.evaluate, inputs, _context(config, _run_id(run)))
    return outputs.model_dump_json()


def run_register_and_promote(
    config_json: str, run: str, prompts: str, feedback: str, reward: str, policy: str, evaluation: str
) -> str:
    setup_logging()
    config = parse_pipeline_config(config_json)
    started = json.loads(run)
    inputs = register_and_promote.Inputs(
        policy=json.loads(policy)["policy"],
        reward_model=json.loads(reward)["reward_model"],
        evaluation=json.loads(evaluation)["metrics"],
        reward_model_accuracy=json.loads(reward)["eval_accuracy"],
        lineage={
            "prompts_hash": json.loads(prompts)["content_hash"],
            "feedback_hash": json.loads(feedback)["content_hash"],
            "config_hash": config.config_hash(),
            "base_policy": config.policy,
        },
        parent_version=started["champion_version"],
    )
    context = _context(config, started["run_id"])
    outputs = register_and_promote.run(config.register_and_promote, inputs, context)
    finish_pipeline_run(context)
    return outputs.model_dump_json()
