"""generate_candidates: K sampled answers per prompt from a policy, exported as annotation tasks."""

from rlhf_components.generate_candidates.step import AnnotationTask, Candidate, Config, Inputs, Outputs, run

__all__ = ["AnnotationTask", "Candidate", "Config", "Inputs", "Outputs", "run"]
