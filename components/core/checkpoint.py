"""Trainer checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

A checkpoint location (local or s3://) holds one directory per saved step (`step-00000042/` with
`tensors.safetensors` and `state.json`) and a `latest.json` pointer, written last: a process killed while
saving leaves the previous checkpoint intact and current. Older step directories are removed after the
pointer moves. Optimizer states are flattened to tensors + JSON; RNG states
are byte tensors. Trainers call `save` every N steps and when asked to stop (SIGTERM: preemption on
Kubernetes), and `load` at start-up to resume.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError

log = logging.getLogger(__name__)

STEP_FOLDER = re.compile(r"step-\d{8}")
TENSORS = "tensors.safetensors"
STATE = "state.json"
LATEST = "latest.json"


def flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, JSON-able rest) of an optimizer's state_dict."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def restore_optimizer(
    prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: Any
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(f"{prefix}."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in rest["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def exists(uri: str) -> bool:
    return storage.exists(storage.join(uri, LATEST))


def save(uri: str, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    name = f"step-{step:08d}"
    with tempfile.TemporaryDirectory() as temp:
        # safetensors refuses tensors that share memory (tied embeddings): store private CPU copies.
        copies = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        save_file(copies, str(Path(temp, TENSORS)))
        data = Path(temp, TENSORS).read_bytes()
        storage.write_bytes(storage.join(uri, name, TENSORS), data)
    state = {**state, "step": step, "tensors_sha256": storage.sha256_hex(data)}
    storage.write_json(storage.join(uri, name, STATE), state)
    storage.write_json(storage.join(uri, LATEST), {"step": step, "directory": name})
    for stale in _step_directories(uri) - {name}:
        storage.remove(storage.join(uri, stale))
    log.info("checkpoint saved to %s (step %d)", uri, step)


def _step_directories(uri: str) -> set[str]:
    root = uri.rstrip("/") + "/"
    tops = {f[len(root) :].split("/", 1)[0] for f in storage.list_files(uri) if f.startswith(root)}
    return {top for top in tops if top.startswith("step-")}


class Damaged(UserError):
    """A checkpoint that cannot be resumed from as it is."""

    def __init__(self, uri: str, problem: str) -> None:
        one_line = " ".join(problem.split())
        super().__init__(f"{uri}: the checkpoint is damaged ({one_line}); set resume: false to start over")


def load(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of the newest checkpoint at `uri`, checked: the pointer names a step folder of this
    checkpoint (never a path outside it), the state is JSON, the tensors match their sha256."""
    pointer = _json(uri, storage.join(uri, LATEST))
    name = pointer.get("directory")
    if not isinstance(name, str) or not STEP_FOLDER.fullmatch(name):
        raise Damaged(uri, f"{LATEST} points at {name!r}, not at a step folder of this checkpoint")
    state = _json(uri, storage.join(uri, name, STATE))
    if not storage.exists(storage.join(uri, name, TENSORS)):
        raise Damaged(uri, f"{name}/{TENSORS} is missing")
    data = storage.read_bytes(storage.join(uri, name, TENSORS))
    if state.get("tensors_sha256") != storage.sha256_hex(data):
        raise Damaged(uri, f"{name}/{TENSORS} does not match its sha256: truncated or changed")
    try:
        with tempfile.TemporaryDirectory() as temp:
            path = Path(temp, TENSORS)
            path.write_bytes(data)
            tensors = load_file(str(path))
    except Exception as error:  # safetensors' own error types vary by version
        raise Damaged(uri, f"{name}/{TENSORS} is not a safetensors file: {error}") from None
    return tensors, state


def _json(uri: str, file_uri: str) -> dict[str, Any]:
    if not storage.exists(file_uri):
        raise Damaged(uri, f"{file_uri} is missing")
    try:
        value = json.loads(storage.read_text(file_uri))
    except (ValueError, UnicodeDecodeError) as error:
        raise Damaged(uri, f"{file_uri} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise Damaged(uri, f"{file_uri} is not a JSON object")
    return value


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(f"{prefix}.")}


class StopRequest:
    """SIGTERM sets a flag instead of killing the process, so the trainer can checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d received: checkpointing after this step, then stopping", signum)
        self.requested = True

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signal handling to the caller
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
