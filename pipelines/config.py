"""The configuration of one pipeline run: shared settings plus one section per step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_components.collect_prompts import Config as CollectPromptsConfig
from rlhf_components.core import storage
from rlhf_components.core.config import StrictModel, load_yaml_config, parse_yaml_text, validate_mapping
from rlhf_components.core.tracking import TrackingConfig
from rlhf_components.demo import DemoAssetsSpec
from rlhf_components.dpo import Config as DPOConfig
from rlhf_components.evaluate import Config as EvaluateConfig
from rlhf_components.generate_candidates import Config as GenerateCandidatesConfig
from rlhf_components.grpo import Config as GRPOConfig
from rlhf_components.ingest_feedback import Config as IngestFeedbackConfig
from rlhf_components.ppo import Config as PPOConfig
from rlhf_components.register_and_promote import Config as RegisterConfig
from rlhf_components.train_reward_model import Config as RewardModelConfig

MODEL_STEPS = ("generate_candidates", "train_reward_model", "ppo", "dpo", "grpo", "evaluate")
TRAINERS = ("train_reward_model", "ppo", "dpo", "grpo")


TASKS = Literal[
    "start_run",
    "collect_prompts",
    "generate_candidates",
    "ingest_feedback",
    "train_reward_model",
    "ppo",
    "dpo",
    "grpo",
    "evaluate",
    "register_and_promote",
]
CPU = Field(default=None, pattern=r"^([0-9]*[.])?[0-9]+m?$", description="cores, e.g. 2, 0.5 or 500m")
MEMORY = Field(default=None, pattern=r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$", description="e.g. 16Gi")


class TaskResources(StrictModel):
    """A task's pod requests and limits on Kubernetes (compiled into the pipeline; kfp.local ignores them)."""

    cpu_request: str | None = CPU
    cpu_limit: str | None = CPU
    memory_request: str | None = MEMORY
    memory_limit: str | None = MEMORY


class DemoAssetsConfig(StrictModel):
    """Build the demo task's assets (cached) before the run; paths in the config may point into `dir`."""

    dir: str = ".rlhf-demo"
    spec: DemoAssetsSpec = Field(default_factory=DemoAssetsSpec)


class PipelineConfig(StrictModel):
    name: str = Field(default="rlhf", pattern=r"^[a-z0-9][a-z0-9-]*$")
    pipeline: Literal["rlhf", "dpo", "grpo", "grpo-feedback"] = Field(
        default="rlhf",
        description="rlhf: reward model + PPO; dpo: Direct Preference Optimization; grpo: GRPO/RLOO on "
        "the rewards of the grpo section; grpo-feedback: the same, plus a reward model trained from feedback",
    )
    seed: int = 0
    policy: str = Field(description="the SFT policy: checkpoint dir, s3:// prefix or models:/name@alias")
    reward_model: str | None = Field(
        default=None,
        description="a trained reward model to use as it is instead of training one (rlhf, grpo-feedback): "
        "a checkpoint dir, s3:// prefix or models:/name@alias; it is scored on the feedback, never trained",
    )
    storage_root: str = Field(description="step outputs go to <storage_root>/<pipeline run id>/<step>/")
    feedback_inbox: str | None = Field(
        default=None,
        description="annotation tasks are written to tasks/, judgements read from labels/ (rlhf and dpo)",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    demo_assets: DemoAssetsConfig | None = None
    collect_prompts: CollectPromptsConfig
    generate_candidates: GenerateCandidatesConfig = Field(default_factory=GenerateCandidatesConfig)
    ingest_feedback: IngestFeedbackConfig = Field(default_factory=IngestFeedbackConfig)
    train_reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    grpo: GRPOConfig | None = Field(default=None, description="the grpo pipeline's trainer and its rewards")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register_and_promote: RegisterConfig = Field(default_factory=RegisterConfig)
    resources: dict[TASKS, TaskResources] = Field(
        default_factory=dict,
        description="per task (step name): CPU and memory requests and limits of its pod on Kubernetes, "
        "compiled into the pipeline by `rlhf submit`, `rlhf schedule` and `rlhf compile --config`",
    )

    @model_validator(mode="after")
    def _kubernetes_pods_can_reach_storage(self) -> PipelineConfig:
        for step in TRAINERS:
            section = getattr(self, step)
            if (
                section
                and section.launcher in ("trainjob", "pytorchjob")
                and not storage.is_s3(self.storage_root)
            ):
                raise ValueError(
                    f"{step}.launcher: {section.launcher} pods read and write through storage_root, "
                    f"which must be s3:// (it is {self.storage_root!r})"
                )
        return self

    @model_validator(mode="after")
    def _a_reward_model_only_for_rlhf(self) -> PipelineConfig:
        if self.pipeline in ("dpo", "grpo") and self.reward_model is not None:
            where = "grpo.rewards" if self.pipeline == "grpo" else "the rlhf pipeline"
            raise ValueError(
                f"reward_model: the {self.pipeline} pipeline trains with no reward model of its own (give "
                f"one in {where})"
            )
        return self

    @model_validator(mode="after")
    def _each_pipeline_has_its_inputs(self) -> PipelineConfig:
        if self.pipeline.startswith("grpo") and self.grpo is None:
            raise ValueError(f"grpo: the {self.pipeline} pipeline needs a grpo section")
        if self.pipeline == "grpo" and self.grpo and not self.grpo.rewards:
            raise ValueError("grpo.rewards: the grpo pipeline needs at least one reward")
        if self.pipeline != "grpo" and self.feedback_inbox is None:
            raise ValueError(
                f"feedback_inbox: the {self.pipeline} pipeline learns from feedback; name its inbox"
            )
        return self

    @property
    def inbox(self) -> str:
        assert self.feedback_inbox is not None, "validated: rlhf and dpo runs have an inbox"
        return self.feedback_inbox

    @model_validator(mode="after")
    def _gates_on_what_evaluate_measures(self) -> PipelineConfig:
        """A gate metric that evaluate never produces would hold every run, silently, for ever."""
        metric = self.register_and_promote.gate.metric
        measured = {
            "rm_win_rate": "the reward model" if self.pipeline in ("rlhf", "grpo-feedback") else None,
            "gold_win_rate": "a gold judge" if self.evaluate.gold_judge else None,
            "judge_win_rate": "an LLM judge" if self.evaluate.judge else None,
            "reward_win_rate": "the evaluation's rewards" if self.evaluate.rewards else None,
        }
        available = [name for name, source in measured.items() if source is not None]
        if metric in available:
            return self
        if metric == "rm_win_rate":
            why = f"the {self.pipeline} pipeline trains no reward model, so there is no rm_win_rate"
        elif metric in measured:
            field = {
                "gold_win_rate": "evaluate.gold_judge",
                "judge_win_rate": "evaluate.judge",
                "reward_win_rate": "evaluate.rewards",
            }[metric]
            why = f"no {field} is set, so there is no {metric}"
        else:
            why = f"evaluate produces no {metric}"
        can = f"gate on {' or '.join(available)}" if available else "this run measures no win rate to gate on"
        raise ValueError(f"register_and_promote.gate.metric: {why}; {can}")

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    return load_yaml_config(PipelineConfig, path)


def parse_pipeline_config(text: str, source: str = "<pipeline parameter config>") -> PipelineConfig:
    return validate_mapping(PipelineConfig, parse_yaml_text(text, source), source)


def _absolute(uri: str) -> str:
    if storage.is_s3(uri) or "://" in uri or uri.startswith("models:/"):
        return uri
    return str(Path(uri).expanduser().resolve())


def with_absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """Local paths resolved against the current directory, so every task sees the same files."""
    updates: dict[str, object] = {
        "policy": _absolute(config.policy),
        "reward_model": config.reward_model and _absolute(config.reward_model),
        "storage_root": _absolute(config.storage_root),
        "feedback_inbox": config.feedback_inbox and _absolute(config.feedback_inbox),
        "collect_prompts": config.collect_prompts.model_copy(
            update={"sources": [_absolute(s) for s in config.collect_prompts.sources]}
        ),
    }
    for step in MODEL_STEPS:
        section = getattr(config, step)
        if section is None:
            continue
        paths: dict[str, Any] = {}
        if section.chat_template not in ("auto", "none"):
            paths["chat_template"] = _absolute(section.chat_template)
        if getattr(section, "base", None):
            paths["base"] = _absolute(section.base)
        if step in ("grpo", "evaluate"):
            paths["rewards"] = [
                reward.model_copy(
                    update={"reward_model": reward.reward_model and _absolute(reward.reward_model)}
                )
                for reward in section.rewards
            ]
        updates[step] = section.model_copy(update=paths)
    if config.demo_assets is not None:
        updates["demo_assets"] = config.demo_assets.model_copy(
            update={"dir": _absolute(config.demo_assets.dir)}
        )
    return config.model_copy(update=updates)
