"""evaluate: the candidate policy against the reference (and the champion) on held-out prompts."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.evaluate.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
