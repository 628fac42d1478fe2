import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.train_reward_model.step import Config, Inputs, run

sys.exit(run_standalone("train_reward_model", Config, Inputs, run))
