import sys

from rlhf_components.collect_prompts.step import Config, Inputs, run
from rlhf_components.core.step import run_standalone

sys.exit(run_standalone("collect_prompts", Config, Inputs, run))
