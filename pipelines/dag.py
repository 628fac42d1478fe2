"""The two DAGs, RLHF and DPO. Every task receives the whole run config (a JSON string) and its upstream
tasks' outputs. Both start alike: candidates come from the champion (the last promoted policy), so each
run's annotation tasks are answered by the newest policy; DPO then trains on the preferences directly."""

from kfp import dsl

from rlhf_pipelines import components as c


@dsl.pipeline(name="rlhf", description="RLHF: prompts → candidates → feedback → reward model → PPO → gate")
def rlhf_pipeline(config: str) -> str:
    run = c.start_run(config=config).set_retry(2)
    prompts = c.collect_prompts(config=config, run=run.output)
    candidates = c.generate_candidates(config=config, run=run.output, prompts=prompts.output)
    feedback = c.ingest_feedback(config=config, run=run.output, candidates=candidates.output)
    reward = c.train_reward_model(config=config, run=run.output, feedback=feedback.output)
    policy = c.ppo(config=config, run=run.output, prompts=prompts.output, reward=reward.output)
    evaluation = c.evaluate(
        config=config, run=run.output, prompts=prompts.output, reward=reward.output, policy=policy.output
    )
    registered = c.register_and_promote(
        config=config,
        run=run.output,
        prompts=prompts.output,
        feedback=feedback.output,
        reward=reward.output,
        policy=policy.output,
        evaluation=evaluation.output,
    ).set_retry(2)
    for task in (run, prompts, candidates, feedback, reward, policy, evaluation, registered):
        c.use_cluster_credentials(task)
    return registered.output


@dsl.pipeline(name="dpo", description="DPO: prompts → candidates → feedback → DPO → gate")
def dpo_pipeline(config: str) -> str:
    run = c.start_run(config=config).set_retry(2)
    prompts = c.collect_prompts(config=config, run=run.output)
    candidates = c.generate_candidates(config=config, run=run.output, prompts=prompts.output)
    feedback = c.ingest_feedback(config=config, run=run.output, candidates=candidates.output)
    policy = c.dpo(config=config, run=run.output, feedback=feedback.output)
    no_reward_model = "null"
    evaluation = c.evaluate(
        config=config, run=run.output, prompts=prompts.output, reward=no_reward_model, policy=policy.output
    )
    registered = c.register_and_promote(
        config=config,
        run=run.output,
        prompts=prompts.output,
        feedback=feedback.output,
        reward=no_reward_model,
        policy=policy.output,
        evaluation=evaluation.output,
    ).set_retry(2)
    for task in (run, prompts, candidates, feedback, policy, evaluation, registered):
        c.use_cluster_credentials(task)
    return registered.output


PIPELINES = {"rlhf": rlhf_pipeline, "dpo": dpo_pipeline}
