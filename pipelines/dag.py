"""The DAGs: RLHF, DPO, GRPO and GRPO on a reward model trained from feedback. Every task receives the whole
run config (a JSON string) and its upstream tasks' outputs. RLHF and DPO start alike: candidates come from
the champion (the last promoted policy), so each run's annotation tasks are answered by the newest policy;
DPO then trains on the preferences directly. GRPO needs no feedback: its rewards (functions, reward models,
endpoints) score the policy's own samples of the prompts; grpo-feedback starts like RLHF and adds the
reward model it trains to those rewards. The trainers are retried, and a retry resumes from the checkpoint
the failed attempt left behind."""

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from kfp import dsl
from kfp.dsl import PipelineTask as Task

from rlhf_pipelines import components as c
from rlhf_pipelines.config import TaskResources


def _json(task: Task) -> Any:
    """A task's JSON output (tasks that also leave KFP artifacts have several outputs)."""
    return task.outputs["Output"]


NONE = "null"
"""An upstream output a pipeline does not have (DPO's and GRPO's reward model, GRPO's feedback)."""


def _preferences(config: str) -> tuple[Task, Task, Task, Task]:
    """start_run → collect_prompts → generate_candidates (from the champion) → ingest_feedback."""
    run = c.start_run(config=config).set_retry(2)
    prompts = c.collect_prompts(config=config, run=_json(run))
    candidates = c.generate_candidates(config=config, run=_json(run), prompts=_json(prompts))
    feedback = c.ingest_feedback(config=config, run=_json(run), candidates=_json(candidates))
    return run, prompts, candidates, feedback


def _evaluate_and_gate(
    config: str, run: Task, prompts: Task, feedback: Any, reward: Any, policy: Task
) -> tuple[Task, Task]:
    """evaluate (vs SFT and champion) → register_and_promote (lineage, aliases, evidence gate)."""
    evaluation = c.evaluate(
        config=config, run=_json(run), prompts=_json(prompts), reward=reward, policy=_json(policy)
    )
    registered = c.register_and_promote(
        config=config,
        run=_json(run),
        prompts=_json(prompts),
        feedback=feedback,
        reward=reward,
        policy=_json(policy),
        evaluation=_json(evaluation),
    ).set_retry(2)
    return evaluation, registered


DISPLAY_NAMES = {
    "start-run": "start the MLflow run",
    "collect-prompts": "collect prompts",
    "generate-candidates": "generate candidates (champion)",
    "ingest-feedback": "ingest feedback",
    "train-reward-model": "train the reward model",
    "ppo": "PPO",
    "dpo": "DPO",
    "grpo": "GRPO / RLOO",
    "evaluate": "evaluate vs SFT and champion",
    "register-and-promote": "register, gate, promote",
}


_resources: ContextVar[Mapping[str, TaskResources] | None] = ContextVar("task_resources", default=None)


def _for_kfp(tasks: tuple[Task, ...], model_tasks: tuple[Task, ...]) -> None:
    """How KFP shows and runs each task: a readable name; never from cache, since every task reads state
    that changes between runs with the same config (the inbox, the prompt prefixes, the registry's
    champion, the run it records in); the cluster's credentials; the config's CPU and memory for its pod.
    The model tasks get the GPUs RLHF_TASK_GPUS asks for."""
    for task in tasks:
        task.set_display_name(DISPLAY_NAMES[task.name]).set_caching_options(enable_caching=False)
        c.use_cluster_credentials(task)
        resources = (_resources.get() or {}).get(task.name.replace("-", "_"), TaskResources())
        for setting, value in resources.model_dump(exclude_none=True).items():
            getattr(task, f"set_{setting}")(value)
    for task in model_tasks:
        c.request_gpus(task)


def _with_a_reward_model(config: str, trainer: Any) -> Any:
    """preferences → train_reward_model → `trainer` (ppo or grpo) on that reward model → evaluate → gate."""
    run, prompts, candidates, feedback = _preferences(config)
    reward = c.train_reward_model(config=config, run=_json(run), feedback=_json(feedback)).set_retry(2)
    policy = trainer(config=config, run=_json(run), prompts=_json(prompts), reward=_json(reward)).set_retry(2)
    evaluation, registered = _evaluate_and_gate(config, run, prompts, _json(feedback), _json(reward), policy)
    _for_kfp(
        (run, prompts, candidates, feedback, reward, policy, evaluation, registered),
        (candidates, reward, policy, evaluation),
    )
    return _json(registered)


def rlhf_pipeline(config: str) -> str:
    return _with_a_reward_model(config, c.ppo)


def dpo_pipeline(config: str) -> str:
    run, prompts, candidates, feedback = _preferences(config)
    policy = c.dpo(config=config, run=_json(run), feedback=_json(feedback)).set_retry(2)
    evaluation, registered = _evaluate_and_gate(config, run, prompts, _json(feedback), NONE, policy)
    _for_kfp(
        (run, prompts, candidates, feedback, policy, evaluation, registered), (candidates, policy, evaluation)
    )
    return _json(registered)


def grpo_pipeline(config: str) -> str:
    run = c.start_run(config=config).set_retry(2)
    prompts = c.collect_prompts(config=config, run=_json(run))
    policy = c.grpo(config=config, run=_json(run), prompts=_json(prompts), reward=NONE).set_retry(2)
    evaluation, registered = _evaluate_and_gate(config, run, prompts, NONE, NONE, policy)
    _for_kfp((run, prompts, policy, evaluation, registered), (policy, evaluation))
    return _json(registered)


def grpo_feedback_pipeline(config: str) -> str:
    return _with_a_reward_model(config, c.grpo)


DAGS: dict[str, tuple[Callable[[str], str], str]] = {
    "rlhf": (rlhf_pipeline, "RLHF: prompts → candidates → feedback → reward model → PPO → gate"),
    "dpo": (dpo_pipeline, "DPO: prompts → candidates → feedback → DPO → gate"),
    "grpo": (grpo_pipeline, "GRPO/RLOO: prompts → grpo (rewards on the policy's samples) → gate"),
    "grpo-feedback": (
        grpo_feedback_pipeline,
        "GRPO/RLOO on a reward model trained from feedback (plus the configured rewards) → gate",
    ),
}


def build(name: str, resources: Mapping[str, TaskResources] | None = None) -> Any:
    """The KFP pipeline `name`, its tasks' pods sized by `resources` (the config's `resources` section)."""
    dag, description = DAGS[name]
    token = _resources.set(resources or {})
    try:
        return dsl.pipeline(name=name, description=description)(dag)  # builds the graph now
    finally:
        _resources.reset(token)


PIPELINES = {name: build(name) for name in DAGS}
