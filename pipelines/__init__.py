"""rlhf_pipelines: the KFP DAGs, and compiling, running, submitting and scheduling them; the `rlhf` CLI."""
