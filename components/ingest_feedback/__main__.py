import sys

from rlhf_components.core.step import run_standalone
from rlhf_components.ingest_feedback.step import Config, Inputs, run

sys.exit(run_standalone("ingest_feedback", Config, Inputs, run))
