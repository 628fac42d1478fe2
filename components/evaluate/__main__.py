import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.evaluate.step import Config, Inputs, run

sys.exit(run_standalone("evaluate", Config, Inputs, run))
