"""train_reward_model: a scalar-head sequence classifier trained with the Bradley–Terry loss."""

from rlhf_components.train_reward_model.step import Config, Inputs, Outputs, run

__all__ = ["Config", "Inputs", "Outputs", "run"]
