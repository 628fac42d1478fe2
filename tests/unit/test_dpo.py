"""DPO: every loss against its formula in float64, the zero-step identities, the response-only masking, a
tiny model that learns the demo's preferences, and resume."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from rlhf_components import dpo
from rlhf_components.core.losses import preference_loss
from rlhf_components.core.models import load_policy
from rlhf_components.core.records import PreferencePair
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets
from rlhf_components.dpo.step import pair_logps, response_logps

from ._helpers import child_runs, sentiment_pairs, write_jsonl

POLICY_CHOSEN = [-10.0, -3.5, -20.25, -7.0, -1.0]
POLICY_REJECTED = [-12.0, -3.0, -18.0, -7.0, -9.5]
REFERENCE_CHOSEN = [-11.0, -4.0, -19.0, -6.0, -2.0]
REFERENCE_REJECTED = [-11.5, -2.5, -18.5, -7.5, -9.0]


def reference_loss(loss: str, beta: float, smoothing: float, i: int) -> float:
    """The published formulas, in float64 from the raw numbers."""
    h = (POLICY_CHOSEN[i] - REFERENCE_CHOSEN[i]) - (POLICY_REJECTED[i] - REFERENCE_REJECTED[i])

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    if loss == "sigmoid":
        return -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
    if loss == "robust":
        robust = -(1 - smoothing) * log_sigmoid(beta * h) + smoothing * log_sigmoid(-beta * h)
        return robust / (1 - 2 * smoothing)
    if loss == "hinge":
        return max(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize(
    ("loss", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_every_loss_equals_its_formula(loss: str, smoothing: float, beta: float) -> None:
    config = dpo.Config(loss=loss, beta=beta, label_smoothing=smoothing)  # type: ignore[arg-type]
    tensors = [
        torch.tensor(v, dtype=torch.float64)
        for v in (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)
    ]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        *tensors, config.loss, config.beta, config.label_smoothing
    )
    for i in range(len(POLICY_CHOSEN)):
        assert losses[i].item() == pytest.approx(reference_loss(loss, beta, smoothing, i), abs=1e-6)
        chosen, rejected = POLICY_CHOSEN[i] - REFERENCE_CHOSEN[i], POLICY_REJECTED[i] - REFERENCE_REJECTED[i]
        assert chosen_rewards[i].item() == pytest.approx(beta * chosen, abs=1e-9)
        assert rejected_rewards[i].item() == pytest.approx(beta * rejected, abs=1e-9)


def test_a_policy_equal_to_its_reference_has_zero_rewards_and_loss_log_2(tiny_assets: DemoAssets) -> None:
    policy, fmt = load_policy(tiny_assets.sft_model_dir)
    pairs = [PreferencePair(**pair) for pair in sentiment_pairs(6, seed=1)]
    encoded = [(*fmt.answer_ids(p.prompt, p.chosen), fmt.answer_ids(p.prompt, p.rejected)[1]) for p in pairs]
    config = dpo.Config()
    with torch.no_grad():
        chosen, rejected, _ = pair_logps(policy, fmt, encoded)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            chosen, rejected, chosen, rejected, config.loss, config.beta
        )
    assert torch.equal(chosen_rewards, torch.zeros(6)) and torch.equal(rejected_rewards, torch.zeros(6))
    assert torch.allclose(losses, torch.full((6,), math.log(2)), atol=1e-7)


def test_only_response_tokens_count_and_padding_changes_nothing(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    tokenizer = fmt.tokenizer
    prompts = ["Review of the ramen:", "Review of the tiny corner bakery on the main street:"]
    responses = [" Great.", " The bread was fresh and the staff were kind."]
    answers = [fmt.answer_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
    ids, _, response_mask = fmt.right_padded(answers)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1  # and EOS
        assert response_mask[row].tolist() == [0] * n_prompt + [1] * n_response + [0] * (
            ids.shape[1] - n_prompt - n_response
        )
        assert ids[row, n_prompt + n_response - 1] == tokenizer.eos_token_id
    with torch.no_grad():
        together, counts = response_logps(model, fmt, answers)
        alone = [response_logps(model, fmt, [answer])[0] for answer in answers]
        # The answer's log-prob token by token, from a forward pass over the prompt and answer alone.
        expected = []
        for prompt, response in zip(prompts, responses, strict=True):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sequence = torch.tensor([prompt_ids + answer])
            log_p = model(input_ids=sequence).logits[0].double().log_softmax(-1)
            start = len(prompt_ids) - 1
            expected.append(sum(log_p[start + k, token].item() for k, token in enumerate(answer)))
    assert torch.allclose(together, torch.cat(alone), atol=1e-4)
    assert together.tolist() == pytest.approx(expected, abs=1e-4)
    assert counts.tolist() == [float(response_mask[i].sum()) for i in range(2)]


def _pairs(tmp_path: Path) -> tuple[str, str]:
    return (
        str(write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(48, seed=21))),
        str(write_jsonl(tmp_path / "eval.jsonl", sentiment_pairs(16, seed=22))),
    )


def test_dpo_learns_the_preferences_and_logs_each_step(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    train, evaluation = _pairs(tmp_path)
    config = dpo.Config(epochs=2, batch_size=8, learning_rate=1e-3, beta=0.1, sft_coef=0.1, max_length=64)
    outputs = dpo.run(
        config, dpo.Inputs(policy=tiny_assets.sft_model_dir, train=train, eval=evaluation), run_context
    )
    assert outputs.steps == 12
    assert outputs.eval_reward_accuracy >= 0.8 and outputs.eval_reward_margin > 0
    assert outputs.eval_loss < math.log(2)
    assert (Path(outputs.policy) / "model.safetensors").is_file()
    [run] = child_runs(run_context, "dpo")
    history = mlflow.MlflowClient().get_metric_history
    for metric in (
        "loss",
        "rewards_chosen",
        "rewards_rejected",
        "reward_margin",
        "reward_accuracy",
        "logps_chosen",
        "logps_rejected",
        "pairs_per_second",
    ):
        assert [m.step for m in history(run.info.run_id, metric)] == list(range(1, 13)), metric
    assert run.data.metrics["eval_reward_accuracy"] == pytest.approx(outputs.eval_reward_accuracy)


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, tiny_assets: DemoAssets, run_context: RunContext
) -> None:
    train, evaluation = _pairs(tmp_path)
    inputs = dpo.Inputs(policy=tiny_assets.sft_model_dir, train=train, eval=evaluation)
    config = dpo.Config(batch_size=8, learning_rate=1e-3, checkpoint_every=1, max_length=64)
    whole = run_context.model_copy(update={"output_root": str(tmp_path / "whole")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit equality: rounding must not follow the load (see test_ppo_resume)
    try:
        uninterrupted = load_file(Path(dpo.run(config, inputs, whole).policy) / "model.safetensors")
        # The checkpoint after step 5 of 6 stays behind; running again resumes from it and takes step 6.
        resumed = load_file(Path(dpo.run(config, inputs, whole).policy) / "model.safetensors")
    finally:
        torch.set_num_threads(threads)
    steps = [
        m.step
        for m in mlflow.MlflowClient().get_metric_history(
            sorted(child_runs(whole, "dpo"), key=lambda r: r.info.start_time)[-1].info.run_id, "loss"
        )
    ]
    assert steps == [6]
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key
