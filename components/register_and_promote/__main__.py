import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.register_and_promote.step import Config, Inputs, run

sys.exit(run_standalone("register_and_promote", Config, Inputs, run))
