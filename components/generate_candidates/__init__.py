"""generate_candidates: K sampled answers per prompt from a policy, exported as annotation tasks."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.generate_candidates.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
