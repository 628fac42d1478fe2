"""The KFP components: each calls `rlhf_pipelines.steps` inside the project image, and leaves its KFP
artifacts (`rlhf_pipelines.artifacts`) beside its JSON output.

Lightweight components (not container components) so that `kfp.local`'s SubprocessRunner can run the same
DAG; `base_image` is the project image, which already has this package installed.
"""

import os
from collections.abc import Callable
from typing import Any

from kfp import dsl

from rlhf_components.core.errors import UserError

IMAGE = os.environ.get("RLHF_IMAGE", "ghcr.io/rlhf-pipelines/rlhf-pipelines:0.1.0-cpu")
# Credentials reach the pods from Kubernetes secrets, never from the config or the compiled YAML.
S3_SECRET = os.environ.get("RLHF_S3_SECRET", "rlhf-s3-credentials")
MLFLOW_SECRET = os.environ.get("RLHF_MLFLOW_SECRET", "rlhf-mlflow-credentials")
# GPUs each model step's pod requests (generate_candidates, train_reward_model, ppo, dpo, grpo, evaluate);
# their `device: auto` then runs there. 0: CPU pods. Needs an image with CUDA PyTorch (containers/Dockerfile).
TASK_GPUS = os.environ.get("RLHF_TASK_GPUS", "0")


def use_cluster_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Expose the S3 and MLflow secrets as environment variables; optional, so IAM roles work too."""
    from kfp import kubernetes

    s3_keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in s3_keys}, optional=True)
    mlflow_keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {key: key for key in mlflow_keys}, optional=True)
    return task


def request_gpus(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """`nvidia.com/gpu: RLHF_TASK_GPUS` for a model step's pod, when that is more than 0."""
    if not TASK_GPUS.isdigit():
        raise UserError(f"RLHF_TASK_GPUS: {TASK_GPUS!r} is not a whole number of GPUs")
    if int(TASK_GPUS) > 0:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(int(TASK_GPUS))
    return task


def _component(func: Callable[..., str]) -> Any:
    return dsl.component(base_image=IMAGE, install_kfp_package=False)(func)


@_component
def start_run(config: str) -> str:
    from rlhf_pipelines.steps import start

    return start(config)


@_component
def collect_prompts(config: str, run: str, prompt_dataset: dsl.Output[dsl.Dataset]) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_collect_prompts

    outputs = run_collect_prompts(config, run)
    artifacts.describe_dataset(outputs, prompt_dataset)
    return outputs


@_component
def generate_candidates(config: str, run: str, prompts: str) -> str:
    from rlhf_pipelines.steps import run_generate_candidates

    return run_generate_candidates(config, run, prompts)


@_component
def ingest_feedback(
    config: str, run: str, candidates: str, preference_dataset: dsl.Output[dsl.Dataset]
) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_ingest_feedback

    outputs = run_ingest_feedback(config, run, candidates)
    artifacts.describe_dataset(outputs, preference_dataset)
    return outputs


@_component
def train_reward_model(config: str, run: str, feedback: str, reward_model: dsl.Output[dsl.Model]) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_train_reward_model

    outputs = run_train_reward_model(config, run, feedback)
    artifacts.trained_model(outputs, "reward_model", reward_model)
    return outputs


@_component
def ppo(config: str, run: str, prompts: str, reward: str, policy: dsl.Output[dsl.Model]) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_ppo

    outputs = run_ppo(config, run, prompts, reward)
    artifacts.trained_model(outputs, "policy", policy)
    return outputs


@_component
def dpo(config: str, run: str, feedback: str, policy: dsl.Output[dsl.Model]) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_dpo

    outputs = run_dpo(config, run, feedback)
    artifacts.trained_model(outputs, "policy", policy)
    return outputs


@_component
def grpo(config: str, run: str, prompts: str, reward: str, policy: dsl.Output[dsl.Model]) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_grpo

    outputs = run_grpo(config, run, prompts, reward)
    artifacts.trained_model(outputs, "policy", policy)
    return outputs


@_component
def evaluate(
    config: str,
    run: str,
    prompts: str,
    reward: str,
    policy: str,
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_evaluate

    outputs = run_evaluate(config, run, prompts, reward, policy)
    artifacts.evaluation(outputs, metrics, report)
    return outputs


@_component
def register_and_promote(
    config: str,
    run: str,
    prompts: str,
    feedback: str,
    reward: str,
    policy: str,
    evaluation: str,
    decision: dsl.Output[dsl.Markdown],
    registered_policy: dsl.Output[dsl.Model],
    registered_reward_model: dsl.Output[dsl.Model],
) -> str:
    from rlhf_pipelines import artifacts
    from rlhf_pipelines.steps import run_register_and_promote

    outputs = run_register_and_promote(config, run, prompts, feedback, reward, policy, evaluation)
    artifacts.decision(outputs, decision, registered_policy, registered_reward_model)
    return outputs
