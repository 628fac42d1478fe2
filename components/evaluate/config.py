"""evaluate: configuration, inputs and outputs.

Pydantic only, so that configs load without importing torch.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_components.core.config import ModelStep, Reward, SamplingConfig, StrictModel

DEFAULT_JUDGE_TEMPLATE = """Which answer to the user's request is better: more helpful, correct and \
appropriate?

[Request]
{prompt}

[Answer A]
{first}

[Answer B]
{second}

Reply with exactly one word: A, B or TIE."""


class JudgeConfig(StrictModel):
    """A pairwise LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM, TGI, OpenAI, an
    MLflow AI gateway). Each pair is judged in both orders; the key is read from the environment only."""

    url: str = Field(pattern=r"^https?://", description="the API's base URL, e.g. http://vllm:8000/v1")
    model: str = Field(min_length=1, description="the judge model's name at that endpoint")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="environment variable holding the API key (none: no key)"
    )
    template: str = Field(
        default=DEFAULT_JUDGE_TEMPLATE,
        description="the user message; {prompt}, {first} and {second} are filled in; the judge answers A, B "
        "or TIE",
    )
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60.0, gt=0.0)
    retries: int = Field(
        default=4, ge=0, description="retries of a request that failed, timed out or got 429/5xx"
    )
    max_requests: int = Field(
        default=2000,
        ge=1,
        description="the cost cap: an evaluation that needs more uncached requests stops before sending any",
    )
    concurrency: int = Field(default=8, ge=1, description="requests in flight at once")
    cache: str | None = Field(
        default=None,
        description="a JSONL file (local or s3://) of verdicts kept across runs; default: the step's output",
    )

    @model_validator(mode="after")
    def _template_names_its_fields(self) -> JudgeConfig:
        missing = [name for name in ("{prompt}", "{first}", "{second}") if name not in self.template]
        if missing:
            raise ValueError(f"template: must contain {', '.join(missing)}")
        return self


class Config(ModelStep):
    max_prompts: int = Field(default=128, ge=1)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.01),
        description="the answers that are judged: near-greedy, each policy's best answer",
    )
    kl_sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="a separate sampled pass for the KL to the reference, at PPO's sampling temperature",
    )
    max_prompt_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)
    bootstrap_samples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    gold_judge: str | None = Field(
        default=None, description="a programmatic judge: demo-gold-sentiment or demo-arithmetic"
    )
    judge: JudgeConfig | None = Field(default=None, description="an LLM judge: judge_win_rate")
    rewards: list[Reward] = Field(
        default_factory=list,
        description="rewards (as in grpo.rewards) scoring each policy's held-out answers, weighted into one: "
        "reward_score (e.g. exact-match accuracy on the prompts' answer column) and reward_win_rate",
    )


class Inputs(StrictModel):
    candidate: str
    reference: str
    champion: str | None = Field(default=None, description="the current production policy, if any")
    reward_model: str | None = Field(default=None, description="none in the DPO pipeline: no rm_* metrics")
    prompts: str = Field(description="held-out prompts (collect_prompts' eval split)")


class Outputs(StrictModel):
    report: str
    report_html: str
    metrics: dict[str, float]
