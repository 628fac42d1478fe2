"""train_reward_model: a scalar-head sequence classifier trained with the Bradley–Terry loss."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.train_reward_model.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
