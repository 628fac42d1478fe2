"""Base model for every config and record, the config parts several steps share (model steps, sampling,
rewards), and YAML loading with errors that name the file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_components.core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelStep(StrictModel):
    """The fields of every step that runs a model."""

    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto: this worker's GPU (cuda:LOCAL_RANK) when CUDA is visible, else the CPU; "
        "or cpu, cuda, cuda:N",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: the checkpoint's own dtype. Trained weights stay float32 (master weights and "
        "optimizer state) and compute under autocast in this dtype; results are saved in it",
    )
    chat_template: str = Field(
        default="auto",
        min_length=1,
        description="auto: the tokenizer's chat template when it has one; none: never (plain text, for base "
        "models and prompts already rendered); or the path of a Jinja file (local or s3://)",
    )
    trust_remote_code: bool = Field(
        default=False, description="run Python code shipped with a checkpoint (custom architectures)"
    )


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.7, gt=0.0)
    top_k: int = Field(default=0, ge=0, description="0 = no top-k filtering (the RLHF default)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="1.0 = no nucleus filtering")
    greedy: bool = Field(default=False, description="argmax decoding, for near-greedy evaluation")
    stop_strings: list[str] = Field(
        default_factory=list,
        description="an answer also ends when its text comes to contain one of these (besides stop tokens)",
    )


BUILT_IN_REWARDS = ("exact_match", "regex", "length")


class Reward(StrictModel):
    """One reward: a Python function, a reward model, or a scoring endpoint, weighted into the total."""

    function: str | None = Field(
        default=None,
        description="a built-in (exact_match, regex, length) or module:function, called as "
        "f(prompts, completions, columns, **options) → one float per completion",
    )
    reward_model: str | None = Field(default=None, description="a reward model: directory, s3:// or models:/")
    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="an endpoint with rlhf serve-reward-model's contract (POST {prompts, responses} → "
        "{scores})",
    )
    timeout_s: float = Field(default=30.0, gt=0.0, description="url: per request")
    retries: int = Field(default=3, ge=0, description="url: retries of a request that failed or timed out")
    batch_size: int = Field(
        default=64, ge=1, description="url: completions per request; reward_model: per forward pass"
    )
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the function")
    name: str | None = Field(default=None, description="its name in the metrics (reward/<name>)")

    @model_validator(mode="after")
    def _one_source(self) -> Reward:
        if sum(source is not None for source in (self.function, self.reward_model, self.url)) != 1:
            raise ValueError("set exactly one of function, reward_model and url")
        if self.function is not None and self.function not in BUILT_IN_REWARDS and ":" not in self.function:
            raise ValueError(
                f"function: {self.function!r} is neither a built-in ({', '.join(BUILT_IN_REWARDS)}) nor "
                "module:function"
            )
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.function:
            return self.function.rsplit(":", 1)[-1]
        return "reward_model" if self.reward_model else "http"


def describe_validation_error(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{field}: {message}")
    return f"{source}: invalid config: " + "; ".join(problems)


def validate_mapping(model: type[ModelT], data: Any, source: str) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A repeated key would silently drop the first section; make it an error instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None


def load_yaml_config(model: type[ModelT], path: str | Path) -> ModelT:
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: config file not found")
    data = parse_yaml_text(config_path.read_text(encoding="utf-8"), str(config_path))
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
    return validate_mapping(model, data, str(config_path))


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → `section.field` keys, the shape MLflow params want."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat
