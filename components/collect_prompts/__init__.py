"""collect_prompts: read prompt sources, normalise, dedupe, filter, split train/eval by hash."""

from rlhf_components.collect_prompts.step import Config, Inputs, Outputs, PromptRecord, run

__all__ = ["Config", "Inputs", "Outputs", "PromptRecord", "run"]
