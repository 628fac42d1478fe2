"""PPO numerics against independent float64 references, and the rollout invariants PPO depends on."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from rlhf_components import ppo
from rlhf_components.core.config import SamplingConfig
from rlhf_components.core.generation import response_logprobs, sample
from rlhf_components.core.losses import (
    KLController,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from rlhf_components.core.models import load_policy
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets

from ._helpers import encoded


def reference_gae(
    rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """GAE written from the definition: A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ V_{t+1} − V_t, V_T = 0."""
    all_advantages, all_returns = [], []
    for row_rewards, row_values, length in zip(rewards, values, lengths, strict=True):
        advantages = [0.0] * len(row_rewards)
        returns = [0.0] * len(row_rewards)
        for t in range(length):
            total = 0.0
            for k in range(length - t):
                next_value = row_values[t + k + 1] if t + k + 1 < length else 0.0
                delta = row_rewards[t + k] + gamma * next_value - row_values[t + k]
                total += (gamma * lam) ** k * delta
            advantages[t] = total
            returns[t] = total + row_values[t]
        all_advantages.append(advantages)
        all_returns.append(returns)
    return all_advantages, all_returns


def test_gae_matches_float64_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths], dtype=torch.float64)
    advantages, returns = gae(rewards * mask, values, mask, gamma=0.99, lam=0.95)
    expected_adv, expected_ret = reference_gae(
        (rewards * mask).tolist(), values.tolist(), lengths, 0.99, 0.95
    )
    assert torch.allclose(advantages, torch.tensor(expected_adv, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(returns, torch.tensor(expected_ret, dtype=torch.float64), atol=1e-10)


def test_masked_whiten_uses_valid_tokens_only() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    whitened = masked_whiten(values, mask)
    expected = (valid - valid.mean()) / valid.std(unbiased=False)
    assert torch.allclose(whitened[mask.bool()], expected, atol=1e-6)
    assert torch.all(whitened[~mask.bool()] == 0)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(kept_mean[mask.bool()], expected + valid.mean(), atol=1e-6)


def test_kl_estimators_match_their_formulas() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    k1 = [a - b for a, b in zip(logp.tolist(), ref.tolist(), strict=True)]
    k3 = [math.exp(b - a) - 1 - (b - a) for a, b in zip(logp.tolist(), ref.tolist(), strict=True)]
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor(k1, dtype=torch.float64))
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.tensor(k3, dtype=torch.float64))
    assert torch.all(kl_per_token(logp, ref, "k3") >= 0)


def test_clipped_losses_match_their_formulas() -> None:
    logp = torch.tensor([[-1.0, -0.2, -3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.3, -0.2, -2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, _, clipped = policy_loss(logp, old, adv, mask, cliprange=0.2)
    expected = []
    for lp, o, a in zip(logp[0, :2].tolist(), old[0, :2].tolist(), adv[0, :2].tolist(), strict=True):
        r = math.exp(lp - o)
        expected.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-12)
    assert clipped[0, 0].item() == 1.0  # ratio e^0.3 > 1.2 with a positive advantage is clipped

    values = torch.tensor([[0.5, 2.0, 9.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.0, 2.1, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    vloss, _ = value_loss(values, old_values, returns, mask, cliprange=0.2)
    errors = []
    for v, o, ret in zip(
        values[0, :2].tolist(), old_values[0, :2].tolist(), returns[0, :2].tolist(), strict=True
    ):
        clipped_v = o + min(max(v - o, -0.2), 0.2)
        errors.append(max((v - ret) ** 2, (clipped_v - ret) ** 2))
    assert vloss.item() == pytest.approx(0.5 * sum(errors) / 2, abs=1e-12)


def test_masked_mean_ignores_padding() -> None:
    values = torch.tensor([[2.0, 4.0, 1000.0]])
    assert masked_mean(values, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(3.0)


def test_adaptive_kl_controller_follows_ziegler_update() -> None:
    controller = KLController(kl_coef=0.1, adaptive=True, target=6.0, horizon=1000)
    controller.update(current_kl=9.0, episodes=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    controller.update(current_kl=5.4, episodes=100)  # error -0.1
    assert controller.value == pytest.approx(0.1 * (1 + 0.02) * (1 - 0.1 * 0.1))
    fixed = KLController(kl_coef=0.1)
    fixed.update(current_kl=100.0, episodes=100)
    assert fixed.value == 0.1


def test_left_padded_greedy_batch_equals_each_prompt_alone(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    assert fmt.pad_id not in fmt.stop_ids  # the demo tokenizer has its own pad token
    prompts = ["Review of the ramen:", "Review of the tiny corner bakery on the main street:"]
    greedy = SamplingConfig(greedy=True, max_new_tokens=12)
    ids, mask = encoded(fmt, prompts)
    assert mask[0, 0] == 0 and ids[0, 0] == fmt.pad_id  # the shorter prompt is left-padded
    together = sample(model, ids, mask, greedy, fmt)
    for row, prompt in enumerate(prompts):
        alone_ids, alone_mask = encoded(fmt, [prompt])
        alone = sample(model, alone_ids, alone_mask, greedy, fmt)
        n = int(alone.response_mask.sum())
        assert together.response_ids[row, :n].tolist() == alone.response_ids[0, :n].tolist()


def test_generation_logprobs_equal_recomputed_logprobs(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    ids, mask = encoded(fmt, ["Review of the ramen:", "Review of a small cafe:"] * 4)
    config = SamplingConfig(temperature=0.7, max_new_tokens=16)
    batch = sample(
        model,
        ids,
        mask,
        config,
        fmt,
        torch.Generator().manual_seed(3),
    )
    with torch.no_grad():
        recomputed = response_logprobs(model, batch, config.temperature)
    assert torch.allclose(recomputed, batch.logprobs, atol=1e-5)
    # Tokens after the first EOS are pad and masked out.
    for row in range(batch.response_ids.shape[0]):
        eos = torch.isin(batch.response_ids[row], torch.tensor(fmt.stop_ids)).nonzero()
        if len(eos):
            first = int(eos[0])
            assert batch.response_mask[row, : first + 1].all()
            assert not batch.response_mask[row, first + 1 :].any()


def test_a_minibatch_drops_the_pad_columns_its_rows_do_not_use(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    prompts = ["Review of the ramen:", "Review of the tiny corner bakery on the main street:"] * 4
    ids, mask = encoded(fmt, prompts)
    config = SamplingConfig(temperature=0.7, max_new_tokens=24)
    generator = torch.Generator().manual_seed(5)
    batch = sample(model, ids, mask, config, fmt, generator)
    short_prompts = torch.tensor([0, 2, 4, 6])  # the left-padded rows
    rows = batch.rows(short_prompts)
    assert rows.query_mask.all()  # no prompt column is pad in every row
    assert rows.query_ids.shape[1] < batch.query_ids.shape[1]
    assert rows.response_ids.shape[1] == int(batch.response_mask[short_prompts].sum(-1).max())
    with torch.no_grad():
        full = response_logprobs(model, batch, config.temperature)[short_prompts]
        trimmed = response_logprobs(model, rows, config.temperature)
    width = rows.response_ids.shape[1]
    assert torch.allclose(trimmed, full[:, :width], atol=1e-5)
    assert not full[:, width:].any()
    assert torch.allclose(rows.logprobs, batch.logprobs[short_prompts, :width])


def test_ppo_run_moves_the_policy_and_logs_every_metric(
    tiny_assets: DemoAssets, run_context: RunContext, tmp_path: object
) -> None:
    from rlhf_components import train_reward_model
    from rlhf_components.core import storage

    pairs = [
        {
            "prompt": "Review of the ramen:",
            "chosen": " great tasty lovely food",
            "rejected": " awful bland rude",
        },
        {
            "prompt": "Review of a cafe:",
            "chosen": " wonderful friendly staff",
            "rejected": " terrible dirty place",
        },
    ] * 8
    train_uri = storage.join(run_context.output_root, "pairs.jsonl")
    storage.write_jsonl(train_uri, pairs)
    reward = train_reward_model.run(
        train_reward_model.Config(learning_rate=1e-3, batch_size=8),
        train_reward_model.Inputs(base_model=tiny_assets.sft_model_dir, train=train_uri, eval=train_uri),
        run_context,
    )
    config = ppo.Config(
        total_episodes=32,
        rollout_batch_size=16,
        num_minibatches=2,
        ppo_epochs=2,
        learning_rate=1e-3,
        sampling=SamplingConfig(max_new_tokens=12),
    )
    outputs = ppo.run(
        config,
        ppo.Inputs(
            policy=tiny_assets.sft_model_dir,
            reward_model=reward.reward_model,
            prompts=tiny_assets.prompts_file,
        ),
        run_context,
    )
    assert outputs.iterations == 2
    before, _ = load_policy(tiny_assets.sft_model_dir)
    after, _ = load_policy(outputs.policy)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    ]
    assert any(changed)
    client = mlflow.MlflowClient(run_context.tracking_uri)
    child = client.search_runs(
        [client.get_experiment_by_name(run_context.experiment).experiment_id],
        filter_string="tags.`rlhf.step` = 'ppo'",
    )[0]
    logged = set(child.data.metrics)
    for metric in (
        "score",
        "rlhf_reward",
        "non_score_reward",
        "kl",
        "entropy",
        "approx_kl",
        "pg_clipfrac",
        "pg_loss",
        "vf_loss",
        "ratio_mean",
        "ratio_var",
        "eos_rate",
        "response_length",
        "episodes_per_second",
        "tokens_per_second",
    ):
        assert metric in logged, metric
    history = client.get_metric_history(child.info.run_id, "first_minibatch_ratio")
    assert history and all(abs(m.value - 1.0) < 1e-5 for m in history)
