"""A reward model served over HTTP (`rlhf serve-reward-model`), for scorers outside this process.

    POST /v1/score  {"prompts": [text or [{role, content}, …]], "responses": [text]}
                →   {"scores": [normalised reward], "raw_scores": [head output], "model": URI}
    GET  /health    {"status": "ok", "model": URI}

A score is what PPO reads from the same model: the head's output at the answer's stop token, normalised with
the statistics train_reward_model saved (mean 0, std 1 over the reference policy's judged answers); a
pretrained model without them is served as it is. Prompts are read the model's way (core.chat: template,
BOS). Requests are scored in batches of `batch_size`, one request at a time. A malformed request is a 422
naming the field; more than `max_items` items is a 413.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import Field, model_validator

from rlhf_components.core.config import ModelStep, StrictModel
from rlhf_components.core.models import load_scalar_model, normalized_rewards, score_in_batches
from rlhf_components.core.records import Prompt

log = logging.getLogger(__name__)


class ScoreRequest(StrictModel):
    prompts: list[Prompt]
    responses: list[str]

    @model_validator(mode="after")
    def _one_response_a_prompt(self) -> ScoreRequest:
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")
        return self


class ScoreResponse(StrictModel):
    scores: list[float] = Field(description="normalised rewards, as PPO reads them")
    raw_scores: list[float] = Field(description="the head's outputs")
    model: str


def create_app(model_uri: str, step: ModelStep, batch_size: int = 16, max_items: int = 4096) -> FastAPI:
    """The app serving the reward model at `model_uri` (local, s3:// or models:/name@alias)."""
    from rlhf_components.core.runtime import select_device

    model, fmt = load_scalar_model(model_uri, step, select_device(step.device, "serve-reward-model"))
    model.eval()
    one_at_a_time = threading.Lock()
    app = FastAPI(title="rlhf-pipelines reward model", version="1")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_uri}

    @app.post("/v1/score")
    def score(request: ScoreRequest) -> ScoreResponse:
        if len(request.prompts) > max_items:
            raise HTTPException(413, f"{len(request.prompts)} items in one request; at most {max_items}")
        with one_at_a_time, torch.no_grad():
            raw_scores = score_in_batches(model, fmt, request.prompts, request.responses, batch_size)
        return ScoreResponse(
            scores=normalized_rewards(model, raw_scores).tolist(),
            raw_scores=raw_scores.tolist(),
            model=model_uri,
        )

    return app


def serve(model_uri: str, step: ModelStep, host: str, port: int, batch_size: int) -> None:
    """Serve until interrupted (uvicorn: one process, one worker)."""
    import uvicorn

    app = create_app(model_uri, step, batch_size)
    log.info("serving reward model %s on http://%s:%d/v1/score", model_uri, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
