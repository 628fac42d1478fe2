"""Process-wide set-up shared by every step: logging, seeding, deterministic threads."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf_components.core.errors import UserError, redacted

if TYPE_CHECKING:
    import torch


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("RLHF_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "botocore", "alembic", "httpx", "git", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    make_record = logging.getLogRecordFactory()
    if not getattr(make_record, "redacts", False):
        logging.setLogRecordFactory(_redacting(make_record))


def _redacting(make_record: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """Log lines never show the credentials of a URI, whichever library logged them and whichever handler
    (kfp.local swaps the root handlers) writes them."""

    def make_redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it when the record is written
            return record
        if "://" in message:
            record.msg, record.args = redacted(message), None
        return record

    make_redacted_record.redacts = True  # type: ignore[attr-defined]
    return make_redacted_record


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG and return a dedicated generator for sampling, so sampling is reproducible alone."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seeded_generator(seed)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device`: sampling on a GPU needs a generator that lives there."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def select_device(setting: str, section: str) -> torch.device:
    """The device a step's models run on. `auto` is this worker's GPU (cuda:LOCAL_RANK: torchrun and
    PyTorchJob set it) when CUDA is visible, else the CPU; `cuda` without an index means the same GPU."""
    import torch

    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{section}.device: {setting} was asked for, but this process sees no CUDA device")
    device = torch.device(setting if ":" in setting else f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{section}.device: {device} does not exist ({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(device)
    return device


def process_rank() -> int:
    """This process's rank among distributed workers (torchrun and PyTorchJob set RANK); 0 when alone."""
    return int(os.environ.get("RANK", "0"))


def sampling_generator(
    seed: int, rank: int, iteration: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator for sampling responses, different on every rank and every iteration: workers that share
    weights and see the same prompts must still explore different responses, or N workers collect one
    worker's data N times. Derived from (seed, rank, iteration) alone, a resumed run needs no saved state
    for it, whatever its worker count."""
    return seeded_generator(((seed * 65_537 + rank + 1) * 1_000_003 + iteration) % 2**63, device)


def progress_disabled() -> bool:
    return os.environ.get("RLHF_NO_PROGRESS", "") not in {"", "0"}
