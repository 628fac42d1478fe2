"""`rlhf serve-reward-model` as a real process on 127.0.0.1: its scores are the in-process reward model's,
for plain prompts and for conversations, and a malformed request is a 422 naming the field. GRPO's HTTP
reward client against it, and against a server in the test that fails on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import TypeAdapter
from unit import chat_models
from unit._helpers import tiny_reward_model

from rlhf_components import grpo
from rlhf_components.core import rewards
from rlhf_components.core.config import Reward
from rlhf_components.core.errors import UserError
from rlhf_components.core.models import load_scalar_model, normalized_rewards, save_checkpoint, score_texts
from rlhf_components.core.records import Prompt
from rlhf_components.demo import DemoAssets

from .conftest import _healthy, _start, _stop, _wait_until, free_port

PROMPTS: list[Any] = [
    "Review of the ramen:",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review of a small cafe:"}],
    "My review of the lamp:",
]
RESPONSES = [" lovely food", " awful service", " it works"]


def serve(model: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    rlhf = str(Path(sys.executable).parent / "rlhf")
    command = [rlhf, "serve-reward-model", model, "--port", str(port), "--batch-size", "2"]
    log_path = tmp_path / f"serve-{port}.log"
    process = _start(command, {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(_healthy(f"{url}/health"), process, "serve-reward-model", log_path, timeout=120)
        yield url
    finally:
        _stop(process)


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/v1/score", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def demo_server(
    tiny_assets: DemoAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    model = tiny_reward_model(tmp_path_factory, tiny_assets.sft_model_dir)
    for url in serve(model, tmp_path_factory.mktemp("serve")):
        yield url, model


def test_served_scores_are_the_in_process_reward_models(demo_server: tuple[str, str]) -> None:
    url, model_uri = demo_server
    texts = [p for p in PROMPTS if isinstance(p, str)]
    status, body = post(url, {"prompts": texts, "responses": RESPONSES[: len(texts)]})
    assert status == 200 and body["model"] == model_uri
    model, fmt = load_scalar_model(model_uri)
    with torch.no_grad():
        raw = score_texts(model, fmt, texts, RESPONSES[: len(texts)])
    assert torch.allclose(torch.tensor(body["raw_scores"]), raw, atol=1e-5)
    assert torch.allclose(torch.tensor(body["scores"]), normalized_rewards(model, raw), atol=1e-5)
    assert torch.tensor(body["scores"]).std() > 0, "the answers score differently"


def test_a_malformed_request_is_a_422_naming_the_field(demo_server: tuple[str, str]) -> None:
    url, _ = demo_server
    status, body = post(url, {"prompts": ["a", "b"], "responses": ["only one"]})
    assert status == 422 and "2 prompts but 1 responses" in json.dumps(body)
    status, body = post(url, {"prompts": ["a"], "answers": ["x"]})
    assert status == 422 and "answers" in json.dumps(body) and "responses" in json.dumps(body)
    status, body = post(url, {"prompts": [], "responses": []})
    assert (status, body["scores"]) == (200, [])


def test_a_chat_reward_model_reads_conversations_through_its_template(tmp_path: Path) -> None:
    backbone = chat_models.build_checkpoint("llama3", tmp_path / "llama3")
    with_head, fmt = load_scalar_model(backbone)  # a head of its own, saved: the server loads the same one
    model_uri = str(tmp_path / "llama3-reward-model")
    save_checkpoint(with_head, fmt, model_uri)
    for url in serve(model_uri, tmp_path):
        status, body = post(url, {"prompts": PROMPTS, "responses": RESPONSES})
        assert status == 200
        model, fmt = load_scalar_model(model_uri)
        with torch.no_grad():
            raw = score_texts(
                model, fmt, [TypeAdapter(Prompt).validate_python(p) for p in PROMPTS], RESPONSES
            )
        assert torch.allclose(torch.tensor(body["raw_scores"]), raw, atol=1e-5)


def test_a_reward_model_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    rlhf = str(Path(sys.executable).parent / "rlhf")
    missing = tmp_path / "missing"
    done = subprocess.run(
        [rlhf, "serve-reward-model", str(missing), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr.strip()) == (2, f"error: {missing}: directory not found")


def test_grpo_scores_through_the_served_reward_model_as_in_process(demo_server: tuple[str, str]) -> None:
    url, model_uri = demo_server
    spec = [Reward(url=f"{url}/v1/score", batch_size=2)]  # 3 completions: two requests
    (scorer,) = rewards.load(
        spec, grpo.Config(rewards=spec), torch.device("cpu"), torch.float32, "grpo.rewards"
    )
    prompts = [TypeAdapter(Prompt).validate_python(p) for p in PROMPTS]
    model, fmt = load_scalar_model(model_uri)
    with torch.no_grad():
        expected = normalized_rewards(model, score_texts(model, fmt, prompts, RESPONSES))
    assert scorer.name == "http"
    assert torch.allclose(scorer.score(prompts, RESPONSES, {}), expected, atol=1e-5)


class Flaky(BaseHTTPRequestHandler):
    """Answers each POST with the next status of `Flaky.statuses` (200: a score of 1 per response)."""

    statuses: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = Flaky.statuses.pop(0)
        answer = {"scores": [1.0] * len(body["responses"])} if status == 200 else {"detail": "busy"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/score"
    finally:
        server.shutdown()


def http_scorer(url: str, retries: int) -> rewards.Scorer:
    spec = [Reward(url=url, retries=retries, timeout_s=5)]
    return rewards.load(spec, grpo.Config(rewards=spec), torch.device("cpu"), torch.float32, "grpo.rewards")[
        0
    ]


def test_an_endpoint_that_fails_is_retried_and_a_4xx_is_one_line(flaky: str) -> None:
    Flaky.statuses = [503, 502, 200]
    assert http_scorer(flaky, retries=2).score(["p", "q"], ["a", "b"], {}).tolist() == [1.0, 1.0]
    Flaky.statuses = [503, 503]
    with pytest.raises(UserError, match=r"grpo\.rewards\[0\]: .* answered 503: .*busy"):
        http_scorer(flaky, retries=1).score(["p"], ["a"], {})
    Flaky.statuses = [400, 200]
    with pytest.raises(UserError, match=r"answered 400"):
        http_scorer(flaky, retries=3).score(["p"], ["a"], {})
    assert Flaky.statuses == [200], "a 4xx is not retried"
    closed = f"http://127.0.0.1:{free_port()}/v1/score"
    with pytest.raises(UserError, match=r"did not answer .* in 2 attempts"):
        http_scorer(closed, retries=1).score(["p"], ["a"], {})
