"""rlhf_components: the pipeline steps of rlhf-pipelines, each runnable alone and wrapped as a KFP component."""
