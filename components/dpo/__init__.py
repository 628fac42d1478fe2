"""dpo: Direct Preference Optimization from preference pairs, against a frozen reference policy."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.dpo.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
