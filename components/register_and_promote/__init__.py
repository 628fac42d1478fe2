"""register_and_promote: MLflow Model Registry versions with lineage, aliases, and an evidence gate."""

from rlhf_components.register_and_promote.step import Config, GateConfig, Inputs, Outputs, run

__all__ = ["Config", "GateConfig", "Inputs", "Outputs", "run"]
