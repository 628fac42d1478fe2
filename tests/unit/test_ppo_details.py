"""The PPO implementation details of DESIGN §4 that are not plain formulas, each checked on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.activations import NewGELUActivation

from rlhf_components import ppo
from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.config import SamplingConfig
from rlhf_components.core.generation import response_logprobs, sample
from rlhf_components.core.models import load_policy, load_scalar_model, save_checkpoint, sequence_scores
from rlhf_components.core.runtime import process_rank, sampling_generator, seed_everything, seeded_generator
from rlhf_components.demo import DemoAssets
from rlhf_components.distributed.collectives import Workers
from rlhf_components.ppo.step import Models, RewardScorer, Rollout, collect_rollout, ppo_kernel, ppo_update

from ._helpers import encoded

PROMPTS = ["Review of the ramen:", "Review of a small cafe near the station:", "My review of the lamp:"] * 2


def test_log_probs_divide_logits_by_the_sampling_temperature(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    ids, mask = encoded(fmt, PROMPTS)
    batch = sample(
        model,
        ids,
        mask,
        SamplingConfig(temperature=0.5, max_new_tokens=6),
        fmt,
        torch.Generator().manual_seed(0),
    )
    sequence, attention, position = batch.sequence()
    with torch.no_grad():
        logits = model(input_ids=sequence, attention_mask=attention, position_ids=position).logits.double()
        start = ids.shape[1] - 1
        width = batch.response_ids.shape[1]
        expected = (logits[:, start : start + width] / 0.5).log_softmax(-1)
        expected = expected.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
        at_half = response_logprobs(model, batch, 0.5).double()
        at_one = response_logprobs(model, batch, 1.0).double()
    assert torch.allclose(at_half, expected, atol=1e-5)
    assert not torch.allclose(at_one, expected, atol=1e-3)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tiny_assets: DemoAssets) -> None:
    reward_model, fmt = load_scalar_model(tiny_assets.sft_model_dir)
    texts = ["Review of the ramen: great soup", "My review of the small lamp I bought: it was bad"]
    alone = []
    for text in texts:
        ids = torch.tensor([fmt.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            alone.append(
                sequence_scores(reward_model, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))
            )
    # Left padding of the prompt and right padding after the response, as a PPO rollout has both.
    rows = [fmt.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows) + 3
    ids = torch.full((2, width), fmt.pad_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    last = []
    for index, row in enumerate(rows):
        offset = 2 if index == 0 else 1
        ids[index, offset : offset + len(row)] = torch.tensor(row)
        mask[index, offset : offset + len(row)] = 1
        last.append(offset + len(row) - 1)
    with torch.no_grad():
        padded = sequence_scores(reward_model, ids, mask, torch.tensor(last))
    assert torch.allclose(padded, torch.cat(alone), atol=1e-5)


def rollout_with(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    scorer: PreTrainedModel,
    fmt: ChatFormat,
    query: tuple[torch.Tensor, torch.Tensor],
    config: ppo.Config,
    kl_coef: float,
    generator: torch.Generator,
) -> Rollout:
    """A rollout of PROMPTS, encoded as `query` (ids, mask); the scalar model `scorer` serves as both the
    reward model and the value model."""
    models = Models(policy, reference, RewardScorer(scorer, fmt, fmt), scorer, fmt)
    return collect_rollout(models, query, PROMPTS, config, kl_coef, generator)


def rollout_of_policy_against_itself(
    assets: DemoAssets, config: ppo.Config, kl_coef: float, seed: int
) -> Rollout:
    """A rollout where the reference is the policy itself and the reward model its backbone with a head."""
    policy, fmt = load_policy(assets.sft_model_dir)
    torch.manual_seed(0)  # the scalar head is new: the same seed gives the same reward model every call
    reward_model, _ = load_scalar_model(assets.sft_model_dir)
    query = encoded(fmt, PROMPTS)
    generator = torch.Generator().manual_seed(seed)
    return rollout_with(policy, policy, reward_model, fmt, query, config, kl_coef, generator)


def test_missing_eos_is_penalised_by_exactly_the_configured_amount(tiny_assets: DemoAssets) -> None:
    def rollout(penalty: float) -> Rollout:
        # Four new tokens: most answers are cut before their EOS.
        config = ppo.Config(
            missing_eos_penalty=penalty,
            rollout_batch_size=6,
            num_minibatches=1,
            sampling=SamplingConfig(max_new_tokens=4, temperature=1.0),
        )
        return rollout_of_policy_against_itself(tiny_assets, config, kl_coef=0.1, seed=1)

    plain, penalised = rollout(0.0), rollout(2.5)
    missing = (~plain.batch.ended_with_eos).float()
    assert missing.sum() > 0
    assert torch.allclose(plain.scores - penalised.scores, 2.5 * missing, atol=1e-6)


def test_score_is_added_at_the_last_response_token_only(tiny_assets: DemoAssets) -> None:
    config = ppo.Config(rollout_batch_size=6, num_minibatches=1, sampling=SamplingConfig(max_new_tokens=12))
    kl_coef = 0.2
    rollout = rollout_of_policy_against_itself(tiny_assets, config, kl_coef, seed=2)
    response_mask = rollout.batch.response_mask.float()
    expected = -kl_coef * rollout.kl
    for row in range(expected.shape[0]):
        last = int(response_mask[row].sum()) - 1
        expected[row, last] += rollout.scores[row]
    assert torch.allclose(rollout.rewards, expected, atol=1e-6)
    # Policy == reference here: the per-token KL is zero up to float error.
    assert rollout.kl.abs().max() < 1e-4
    assert torch.all(rollout.rewards[response_mask == 0] == 0)


def test_dropout_is_disabled_in_every_loaded_model(tiny_assets: DemoAssets) -> None:
    policy, fmt = load_policy(tiny_assets.sft_model_dir)
    scalar, _ = load_scalar_model(tiny_assets.sft_model_dir)
    for model in (policy, scalar):
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.p == 0.0 for m in dropouts)
        model.train()  # even in training mode two forward passes must agree
        ids = torch.tensor([fmt.prompt_ids("Review of the ramen: great")])
        with torch.no_grad():
            first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(first, second)


def test_loaded_models_compute_gpt2_gelu_with_the_fused_kernel(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    policy, fmt = load_policy(tiny_assets.sft_model_dir)
    as_saved = AutoModelForCausalLM.from_pretrained(tiny_assets.sft_model_dir, dtype=torch.float64)
    assert policy.config.activation_function == "gelu_new"
    assert not any(isinstance(m, NewGELUActivation) for m in policy.modules())
    assert any(isinstance(m, NewGELUActivation) for m in as_saved.modules())
    ids = torch.tensor([fmt.prompt_ids("Review of the ramen: great soup")])
    with torch.no_grad():
        fused, reference = policy(input_ids=ids).logits, as_saved(input_ids=ids).logits
    assert torch.allclose(fused.double(), reference, atol=1e-5)
    save_checkpoint(policy, fmt, str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["activation_function"] == "gelu_new"


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep`, as some remote-code models."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> object:
        assert "logits_to_keep" not in inputs
        return self.model(**inputs)


def test_response_log_probs_agree_with_and_without_logits_to_keep(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    ids, mask = encoded(fmt, PROMPTS)
    config = SamplingConfig(temperature=0.7, max_new_tokens=6)
    kept = sample(model, ids, mask, config, fmt, torch.Generator().manual_seed(0))
    wrapped = _NoLogitsToKeep(model)
    full = sample(wrapped, ids, mask, config, fmt, torch.Generator().manual_seed(0))
    assert torch.equal(kept.response_ids, full.response_ids)
    with torch.no_grad():
        with_kept = response_logprobs(model, kept, 0.7)
        with_all = response_logprobs(wrapped, kept, 0.7)
    assert torch.allclose(with_kept, with_all, atol=1e-6)
    assert torch.allclose(with_kept, kept.logprobs, atol=1e-5)


def test_greedy_evaluation_sampling_is_deterministic(tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    ids, mask = encoded(fmt, PROMPTS)
    greedy = SamplingConfig(greedy=True, max_new_tokens=10)
    runs = [
        sample(
            model,
            ids,
            mask,
            greedy,
            fmt,
            torch.Generator().manual_seed(seed),
        )
        for seed in (0, 1)
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_minibatch_and_accumulation_shape_of_an_update(
    tiny_assets: DemoAssets, accumulation: int, tmp_path: Path
) -> None:
    """Every PPO epoch visits each episode once; ratio starts at exactly 1 and moves after the first step."""
    policy, fmt = load_policy(tiny_assets.sft_model_dir)
    value, _ = load_scalar_model(tiny_assets.sft_model_dir)
    reference, _ = load_policy(tiny_assets.sft_model_dir)
    query = encoded(fmt, PROMPTS)
    config = ppo.Config(
        rollout_batch_size=6,
        num_minibatches=2,
        gradient_accumulation_steps=accumulation,
        ppo_epochs=2,
        learning_rate=1e-3,
        sampling=SamplingConfig(max_new_tokens=8),
    )
    generator = torch.Generator().manual_seed(3)
    rollout = rollout_with(policy, reference, value, fmt, query, config, 0.1, generator)
    kernel = ppo_kernel(config, policy, value, Workers(), iterations=1, checkpoint_uri=str(tmp_path))
    optimizer = kernel.optimizer
    stats = ppo_update(policy, value, kernel, rollout, config, generator)
    assert len(stats) > 0 and math.isclose(stats["first_minibatch_ratio"], 1.0, abs_tol=1e-5)
    assert (
        optimizer.state[next(iter(policy.parameters()))]["step"] == config.ppo_epochs * config.num_minibatches
    )
    assert stats["approx_kl"] > 0.0


def test_a_ppo_iteration_creates_every_tensor_on_its_inputs_device(
    tiny_assets: DemoAssets, tmp_path: Path
) -> None:
    """With the default device set to `meta`, any tensor made without naming its device lands on `meta` and
    cannot mix with the CPU tensors of the models and the batch: the mistake that breaks a GPU run, caught
    without a GPU. Models and data are on the CPU here, as a GPU run has them on its GPU."""
    policy, fmt = load_policy(tiny_assets.sft_model_dir)
    value, _ = load_scalar_model(tiny_assets.sft_model_dir)
    reference, _ = load_policy(tiny_assets.sft_model_dir)
    reference.requires_grad_(False)
    query = encoded(fmt, PROMPTS)
    config = ppo.Config(rollout_batch_size=6, num_minibatches=2, sampling=SamplingConfig(max_new_tokens=6))
    kernel = ppo_kernel(config, policy, value, Workers(), iterations=1, checkpoint_uri=str(tmp_path))
    sampler, data_order = sampling_generator(0, 0, 1), seeded_generator(1)
    torch.set_default_device("meta")
    try:
        rollout = rollout_with(policy, reference, value, fmt, query, config, 0.1, sampler)
        stats = ppo_update(policy, value, kernel, rollout, config, data_order)
    finally:
        torch.set_default_device(None)
    assert rollout.advantages.device == torch.device("cpu")
    assert math.isfinite(stats["pg_loss"]) and math.isclose(stats["first_minibatch_ratio"], 1.0, abs_tol=1e-5)
    assert all(p.device == torch.device("cpu") for p in policy.parameters())


def test_each_rank_samples_different_responses_to_the_same_prompts(
    tiny_assets: DemoAssets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks share weights, prompts and data order; only their sampling seeds tell their rollouts apart."""
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    ids, mask = encoded(fmt, PROMPTS * 4)
    config = SamplingConfig(max_new_tokens=12)

    def responses(rank: int) -> torch.Tensor:
        monkeypatch.setenv("RANK", str(rank))
        generator = sampling_generator(seed=7, rank=process_rank())
        batch = sample(model, ids, mask, config, fmt, generator)
        return batch.response_ids

    rank0, rank1 = responses(0), responses(1)
    assert torch.equal(rank0, responses(0))  # a rank is reproducible
    assert rank0.shape != rank1.shape or not torch.equal(rank0, rank1)
    # ... and its stream is not the shared data-order stream of the same seed.
    assert not torch.equal(sampling_generator(7, 0).get_state(), seed_everything(7).get_state())
