"""ingest_feedback: validate annotator judgements from the inbox into a preference dataset."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.ingest_feedback.config import Config, Inputs, Outputs

__all__ = ["Config", "Inputs", "Outputs", "run"]

__getattr__ = step_module_getattr(__name__)
