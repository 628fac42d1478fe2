"""ingest_feedback: validate annotator judgements from the inbox into a preference dataset."""

from rlhf_components.ingest_feedback.step import Config, Inputs, Outputs, Preference, run

__all__ = ["Config", "Inputs", "Outputs", "Preference", "run"]
