"""grpo: critic-free online RL (GRPO, RLOO) from programmatic and model rewards."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.grpo.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
