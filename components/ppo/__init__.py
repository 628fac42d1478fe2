"""ppo: PPO-for-RLHF with a separate value model, a frozen reference and a per-token KL penalty."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.ppo.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
