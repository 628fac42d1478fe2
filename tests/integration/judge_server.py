"""A minimal OpenAI-compatible chat-completions server for the LLM-judge tests, run as its own process.

No third-party OpenAI-compatible server installs on these CPU-only machines (vLLM and TGI need GPUs or
containers), so the tests serve their own. It answers POST /v1/chat/completions for these models:

- `gold:<judge>`: reads the [Request], [Answer A] and [Answer B] sections of the judge template and answers
  A, B or TIE by a programmatic judge (demo-gold-sentiment, demo-arithmetic): verdicts the tests can predict;
- `first`: always A, a judge with pure position bias;
- `hf:<checkpoint dir>`: a tiny causal LM's greedy continuation of the message: free text, as small models
  answer.

`--fail-first N` answers the first N requests 503 (every other one with Retry-After: 0 and 429 instead), to
exercise retries. GET /stats gives the requests seen so far; GET /health answers when it is up.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SECTION = re.compile(r"\[Request\]\n(.*)\n\n\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nReply", re.DOTALL)


def gold_verdict(judge_name: str, content: str) -> str:
    from rlhf_components.demo import resolve_judge

    found = SECTION.search(content)
    if found is None:
        return "I cannot tell."
    prompt, first, second = found.groups()
    judge = resolve_judge(judge_name)
    a, b = judge(prompt, first), judge(prompt, second)
    return "A" if a > b else "B" if b > a else "TIE"


@cache
def _causal_lm(path: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def model_reply(path: str, content: str, max_tokens: int) -> str:
    import torch

    tokenizer, model = _causal_lm(path)
    room = model.config.max_position_embeddings - max_tokens
    ids = tokenizer(content, return_tensors="pt").input_ids[:, -room:]
    with torch.no_grad(), Handler.lock:
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


class Handler(BaseHTTPRequestHandler):
    fail_first = 0
    requests = 0
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._send(200, {"requests": Handler.requests})
        else:
            self._send(200, {"status": "ok"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with Handler.lock:
            Handler.requests += 1
            number = Handler.requests
        if number <= Handler.fail_first:
            if number % 2:
                self._send(503, {"error": "warming up"})
            else:
                self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
            return
        if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer test-key":
            self._send(401 if self.path == "/v1/chat/completions" else 404, {"error": "no"})
            return
        model, content = body["model"], body["messages"][-1]["content"]
        if model.startswith("gold:"):
            reply = gold_verdict(model.removeprefix("gold:"), content)
        elif model == "first":
            reply = "A"
        else:
            reply = model_reply(model.removeprefix("hf:"), content, int(body.get("max_tokens", 8)))
        self._send(
            200,
            {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                ],
            },
        )


@contextmanager
def serving(log_dir: Path, fail_first: int = 0) -> Iterator[str]:
    """This server as a process on a free port of 127.0.0.1; yields its API base URL (…/v1)."""
    from integration.conftest import _healthy, _start, _stop, _wait_until, free_port

    port = free_port()
    log_path = log_dir / f"judge-server-{port}.log"
    command = [sys.executable, __file__, "--port", str(port), "--fail-first", str(fail_first)]
    process = _start(command, {"PATH": str(Path(sys.executable).parent)}, log_path)
    try:
        _wait_until(
            _healthy(f"http://127.0.0.1:{port}/health"), process, "judge server", log_path, timeout=60
        )
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def requests_seen(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return int(json.loads(response.read())["requests"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    Handler.fail_first = args.fail_first
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
