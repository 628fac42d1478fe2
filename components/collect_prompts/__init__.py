"""collect_prompts: read prompt sources, normalise, dedupe, filter, split train/eval by hash."""

from rlhf_components.collect_prompts.config import Config, Inputs, Outputs
from rlhf_components.core.lazy import step_module_getattr

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
