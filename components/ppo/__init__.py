"""ppo: PPO-for-RLHF with a separate value model, a frozen reference and a per-token KL penalty."""

from rlhf_components.ppo.step import Config, Inputs, Outputs, run

__all__ = ["Config", "Inputs", "Outputs", "run"]
