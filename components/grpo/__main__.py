import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.grpo.step import Config, Inputs, run

sys.exit(run_standalone("grpo", Config, Inputs, run))
