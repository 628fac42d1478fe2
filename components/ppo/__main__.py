import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.ppo.step import Config, Inputs, run

sys.exit(run_standalone("ppo", Config, Inputs, run))
