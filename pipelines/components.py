"""The KFP components: one line each, calling `rlhf_pipelines.steps` inside the project image.

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
def collect_prompts(config: str, run: str) -> str:
    from rlhf_pipelines.steps import run_collect_prompts

    return run_collect_prompts(config, run)


@_component
def generate_candidates(config: str, run: str, prompts: str) -> str:
    from rlhf_pipelines.steps import run_generate_candidates

    return run_generate_candidates(config, run, prompts)


@_component
def ingest_feedback(config: str, run: str, candidates: str) -> str:
    from rlhf_pipelines.steps import run_ingest_feedback

    return run_ingest_feedback(config, run, candidates)


@_component
def train_reward_model(config: str, run: str, feedback: str) -> str:
    from rlhf_pipelines.steps import run_train_reward_model

    return run_train_reward_model(config, run, feedback)


@_component
def ppo(config: str, run: str, prompts: str, reward: str) -> str:
    from rlhf_pipelines.steps import run_ppo

    return run_ppo(config, run, prompts, reward)


@_component
def dpo(config: str, run: str, feedback: str) -> str:
    from rlhf_pipelines.steps import run_dpo

    return run_dpo(config, run, feedback)


@_component
def grpo(config: str, run: str, prompts: str, reward: str) -> str:
    from rlhf_pipelines.steps import run_grpo

    return run_grpo(config, run, prompts, reward)


@_component
def evaluate(config: str, run: str, prompts: str, reward: str, policy: str) -> str:
    from rlhf_pipelines.steps import run_evaluate

    return run_evaluate(config, run, prompts, reward, policy)


@_component
def register_and_promote(
    config: str, run: str, prompts: str, feedback: str, reward: str, policy: str, evaluation: str
) -> str:
    from rlhf_pipelines.steps import run_register_and_promote

    return run_register_and_promote(config, run, prompts, feedback, reward, policy, evaluation)
