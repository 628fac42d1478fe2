import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.dpo.step import Config, Inputs, run

sys.exit(run_standalone("dpo", Config, Inputs, run))
