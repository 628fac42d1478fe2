"""distributed: run a trainer with N workers on torch.distributed (torchrun) or a Kubeflow PyTorchJob."""

from rlhf_components.distributed.config import Distributed, PyTorchJobConfig
from rlhf_components.distributed.launcher import launch

__all__ = ["Distributed", "PyTorchJobConfig", "launch"]
