"""Step packages export their configs eagerly and their `run` lazily.

Configs are pydantic only; `run` pulls in torch and transformers. Loading a pipeline config (`rlhf validate`,
`rlhf compile`, `rlhf submit`) therefore stays fast, while `from rlhf_components.ppo import run` still works.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def step_module_getattr(package: str) -> Callable[[str], Any]:
    """A module-level `__getattr__` that imports `<package>.step.run` on first use."""

    def __getattr__(name: str) -> Any:
        if name == "run":
            return importlib.import_module(f"{package}.step").run
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
