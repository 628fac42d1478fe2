"""register_and_promote: MLflow Model Registry versions with lineage, aliases, and an evidence gate."""

from rlhf_components.core.lazy import step_module_getattr
from rlhf_components.register_and_promote.config import Config, GateConfig, Inputs, Outputs, RegisteredVersion

__all__ = ["Config", "GateConfig", "Inputs", "Outputs", "RegisteredVersion", "run"]

__getattr__ = step_module_getattr(__name__)
