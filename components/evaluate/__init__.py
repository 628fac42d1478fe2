"""evaluate: the candidate policy against the reference (and the champion) on held-out prompts."""

from rlhf_components.evaluate.step import Config, Inputs, Outputs, run

__all__ = ["Config", "Inputs", "Outputs", "run"]
