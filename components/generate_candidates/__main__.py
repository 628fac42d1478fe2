import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.generate_candidates.step import Config, Inputs, run

sys.exit(run_standalone("generate_candidates", Config, Inputs, run))
