"""rlhf_components: the steps of rlhf-pipelines, each runnable alone and wrapped as a KFP component."""
