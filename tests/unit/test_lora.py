"""LoRA (core/lora.py) and memory on real architectures: the adapted model starts as its base, only adapters
train, the merged checkpoint computes what the adapted model did, every trainer takes `lora:`, and
recomputed activations (gradient_checkpointing) change nothing but memory."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from rlhf_components import dpo, ppo, register_and_promote, train_reward_model
from rlhf_components.core.config import SamplingConfig, validate_mapping
from rlhf_components.core.errors import ConfigError, UserError
from rlhf_components.core.generation import response_logprobs
from rlhf_components.core.lora import (
    ADAPTER_TAG,
    adapters_disabled,
    add_adapters,
    merge_adapters,
)
from rlhf_components.core.models import load_policy, load_scalar_model, token_scores
from rlhf_components.core.tracking import RunContext
from rlhf_components.core.trainer import start_training
from rlhf_components.core.trainer_config import Lora
from rlhf_components.distributed.collectives import Workers
from rlhf_components.ppo.step import _load_models, collect_rollout, ppo_kernel, ppo_update

from . import chat_models
from ._helpers import encoded, read_jsonl, sentiment_pairs, write_jsonl

PROMPTS = ["Review of the ramen:", "Review of a small cafe near the station:", "My review of the lamp:"]
ARCHITECTURES = ["llama3", "gpt2", "qwen2", "gpt_neox"]
LORA = Lora(rank=4, alpha=8.0)
PPO = ppo.Config(
    rollout_batch_size=3,
    num_minibatches=1,
    ppo_epochs=2,
    learning_rate=1e-2,
    lora=LORA,
    sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora-models")
    return {name: chat_models.build_checkpoint(name, root / name) for name in ARCHITECTURES}


def has_adapters(model: torch.nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def ppo_models(policy: str, config: ppo.Config = PPO) -> ppo.step.Models:
    inputs = ppo.Inputs(policy=policy, reward_model=policy, prompts="unused")
    return _load_models(inputs, config, start_training(config, policy, 0, "ppo"))


def rollout(models: ppo.step.Models, config: ppo.Config = PPO) -> ppo.step.Rollout:
    return collect_rollout(
        models, encoded(models.fmt, PROMPTS), PROMPTS, config, 0.1, torch.Generator().manual_seed(1)
    )


def nudge_adapters(model: torch.nn.Module) -> None:
    """New adapters add exactly zero (B = 0); give B values so that merging has something to fold in."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_at_start_the_lora_policy_is_its_reference_exactly(checkpoints: dict[str, str], name: str) -> None:
    models = ppo_models(checkpoints[name])
    assert models.reference is models.policy, "one copy of the base weights"
    assert models.value_model is models.reward.model, "the value model shares the reward model's base"
    result = rollout(models)
    adapted = response_logprobs(models.policy, result.batch, 1.0)
    with adapters_disabled(models.policy):
        base = response_logprobs(models.policy, result.batch, 1.0)
    assert torch.equal(adapted, base)
    assert torch.equal(result.ref_logprobs, base), "the rollout's reference is the base"
    assert result.batch.response_mask.any(), "the rollout has answer tokens"


def test_a_ppo_update_changes_only_adapters_and_the_value_head(checkpoints: dict[str, str]) -> None:
    models = ppo_models(checkpoints["llama3"])
    policy_before = {k: v.clone() for k, v in models.policy.state_dict().items()}
    value_before = {k: v.clone() for k, v in models.value_model.state_dict().items()}
    result = rollout(models)
    with adapters_disabled(models.value_model):
        ids, mask, position = result.batch.sequence()
        reward_before = token_scores(models.value_model, ids, mask, position)
    kernel = ppo_kernel(PPO, models.policy, models.value_model, Workers(), 1, "unused")
    trained = {id(p) for p in kernel.parameters}
    assert all("lora_" in n for n, p in models.policy.named_parameters() if id(p) in trained)
    ppo_update(models.policy, models.value_model, kernel, result, PPO, torch.Generator().manual_seed(2))

    for before, model in ((policy_before, models.policy), (value_before, models.value_model)):
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed, "training moved something"
        assert all("lora_B" in k or "lora_A" in k or "modules_to_save" in k for k in changed), changed
    assert any(
        "modules_to_save" in k
        for k in value_before
        if not torch.equal(value_before[k], models.value_model.state_dict()[k])
    )
    with adapters_disabled(models.value_model):
        reward_after = token_scores(models.value_model, ids, mask, position)
    assert torch.equal(reward_before, reward_after), "training the value model leaves the reward model alone"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_merged_model_computes_what_the_adapted_model_did(checkpoints: dict[str, str], name: str) -> None:
    ids, mask = encoded(load_policy(checkpoints[name])[1], PROMPTS)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    policy, _ = load_policy(checkpoints[name])
    add_adapters(policy, LORA, "test")
    nudge_adapters(policy)
    adapted = policy(input_ids=ids, attention_mask=mask, position_ids=position).logits
    merge_adapters(policy)
    assert not has_adapters(policy)
    merged = policy(input_ids=ids, attention_mask=mask, position_ids=position).logits
    assert torch.allclose(adapted, merged, atol=1e-5), (adapted - merged).abs().max()

    scorer, _ = load_scalar_model(checkpoints[name])
    add_adapters(scorer, LORA, "test")
    nudge_adapters(scorer)
    with torch.no_grad():
        for name_, parameter in scorer.named_parameters():
            if "modules_to_save" in name_:
                parameter.mul_(3.0)  # the trained head differs from the original
    adapted_scores = token_scores(scorer, ids, mask, position)
    merge_adapters(scorer)
    assert torch.allclose(adapted_scores, token_scores(scorer, ids, mask, position), atol=1e-5)


def test_unknown_target_modules_name_the_field(checkpoints: dict[str, str]) -> None:
    policy, _ = load_policy(checkpoints["llama3"])
    with pytest.raises(UserError, match=r"ppo\.lora\.target_modules"):
        add_adapters(policy, Lora(target_modules=["no_such_proj"]), "ppo")


def test_lora_dropout_is_refused_in_ppo() -> None:
    with pytest.raises(ConfigError, match=r"lora\.dropout must be 0 in PPO"):
        validate_mapping(ppo.Config, {"lora": {"dropout": 0.1}}, "job.yaml")


# ----------------------------------------------------------------------------- whole trainers


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("lora-pairs")
    return (
        str(write_jsonl(root / "train.jsonl", sentiment_pairs(16, seed=21))),
        str(write_jsonl(root / "eval.jsonl", sentiment_pairs(4, seed=22))),
    )


def lora_dpo(
    policy: str, pairs: tuple[str, str], context: RunContext
) -> tuple[dpo.Inputs, dpo.Config, dpo.Outputs]:
    """A DPO run with LoRA on the pairs: its inputs, its config and its outputs."""
    inputs = dpo.Inputs(policy=policy, train=pairs[0], eval=pairs[1])
    config = dpo.Config(batch_size=8, learning_rate=1e-2, max_length=256, lora=LORA)
    return inputs, config, dpo.run(config, inputs, context)


def answer_logps(policy_uri: str) -> torch.Tensor:
    model, fmt = load_policy(policy_uri)
    answers = [(*fmt.answer_ids(p, " lovely food"), fmt.answer_ids(p, " awful food")[1]) for p in PROMPTS]
    with torch.no_grad():
        return dpo.step.pair_logps(model, fmt, answers)[0]


def test_dpo_with_lora_writes_a_merged_policy_and_an_adapter_a_next_run_continues(
    checkpoints: dict[str, str], pairs: tuple[str, str], run_context: RunContext, tmp_path: Path
) -> None:
    policy = checkpoints["qwen2"]
    inputs, config, first = lora_dpo(policy, pairs, run_context)
    assert first.policy_adapter is not None
    adapter = Path(first.policy_adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == policy and saved["r"] == 4
    assert all("lora_" in key for key in load_file(str(adapter / "adapter_model.safetensors")))
    merged = load_file(str(Path(first.policy) / "model.safetensors"))
    assert not any("lora" in key for key in merged), "the policy is a plain checkpoint"
    assert not torch.equal(answer_logps(first.policy), answer_logps(policy)), "DPO moved the policy"

    # A second run that continues the adapter starts where the first ended: the base plus that adapter.
    continued = config.model_copy(
        update={"lora": LORA.model_copy(update={"adapter": str(adapter)}), "learning_rate": 1e-12}
    )
    second = dpo.run(continued, inputs, run_context.model_copy(update={"output_root": str(tmp_path / "2")}))
    assert torch.allclose(answer_logps(second.policy), answer_logps(first.policy), atol=1e-4)
    mismatched = config.model_copy(update={"lora": Lora(rank=8, alpha=8.0, adapter=str(adapter))})
    with pytest.raises(UserError, match=r"dpo\.lora\.rank: 8, but the adapter .* was trained with 4"):
        dpo.run(mismatched, inputs, run_context)


def test_a_reward_model_with_lora_keeps_its_trained_head_in_the_merged_checkpoint(
    checkpoints: dict[str, str], pairs: tuple[str, str], run_context: RunContext
) -> None:
    inputs = train_reward_model.Inputs(base_model=checkpoints["gpt_neox"], train=pairs[0], eval=pairs[1])
    config = train_reward_model.Config(batch_size=8, learning_rate=1e-2, max_length=256, lora=LORA)
    outputs = train_reward_model.run(config, inputs, run_context)
    assert outputs.adapter is not None
    assert any("score" in key for key in load_file(str(Path(outputs.adapter) / "adapter_model.safetensors")))
    model, fmt = load_scalar_model(outputs.reward_model)
    assert not any("lora" in name or "modules_to_save" in name for name, _ in model.named_parameters())
    # The accuracy reported at the end was measured on the merged model: the saved one scores the same.
    held_out = [
        (*fmt.answer_ids(pair["prompt"], pair["chosen"]), fmt.answer_ids(pair["prompt"], pair["rejected"])[1])
        for pair in read_jsonl(pairs[1])
    ]
    with torch.no_grad():
        chosen, rejected = train_reward_model.step._pair_scores(model, fmt, held_out)
    assert (chosen > rejected).float().mean().item() == pytest.approx(outputs.eval_accuracy)


def test_ppo_with_lora_runs_end_to_end_and_the_merged_policy_is_the_adapted_one(
    checkpoints: dict[str, str], run_context: RunContext, tmp_path: Path
) -> None:
    policy = checkpoints["llama3"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 2])
    inputs = ppo.Inputs(policy=policy, reward_model=policy, prompts=str(prompts))
    config = PPO.model_copy(update={"total_episodes": 6, "gradient_checkpointing": True})
    outputs = ppo.run(config, inputs, run_context)
    assert outputs.policy_adapter is not None and outputs.iterations == 2
    base, fmt = load_policy(policy)
    base.load_adapter(outputs.policy_adapter)
    ids, mask = encoded(fmt, PROMPTS)
    adapted = base(input_ids=ids, attention_mask=mask).logits
    merged, _ = load_policy(outputs.policy)
    assert torch.allclose(adapted, merged(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    original, _ = load_policy(policy)
    assert not torch.allclose(adapted, original(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


def test_a_registered_adapter_is_logged_beside_its_model_and_a_next_run_continues_it(
    checkpoints: dict[str, str], pairs: tuple[str, str], run_context: RunContext, tmp_path: Path
) -> None:
    policy = checkpoints["llama3"]
    inputs, config, trained = lora_dpo(policy, pairs, run_context)
    registered = register_and_promote.run(
        register_and_promote.Config(policy_name="lora-policy"),
        register_and_promote.Inputs(
            policy=trained.policy, policy_adapter=trained.policy_adapter, evaluation={}
        ),
        run_context,
    )
    version = registered.registered["policy"].version
    tag = mlflow.MlflowClient().get_model_version("lora-policy", version).tags[ADAPTER_TAG]
    assert tag.startswith("runs:/") and tag.endswith("/policy_adapter")

    from_registry = LORA.model_copy(update={"adapter": "models:/lora-policy@staging"})
    continued = config.model_copy(update={"lora": from_registry, "learning_rate": 1e-12})
    again = dpo.run(continued, inputs, run_context.model_copy(update={"output_root": str(tmp_path / "2")}))
    assert torch.allclose(answer_logps(again.policy), answer_logps(trained.policy), atol=1e-4)

    full = dpo.run(config.model_copy(update={"lora": None}), inputs, run_context)
    plain = register_and_promote.run(
        register_and_promote.Config(policy_name="full-policy"),
        register_and_promote.Inputs(policy=full.policy, evaluation={}),
        run_context,
    )
    assert plain.registered["policy"].version == "1"
    no_adapter = LORA.model_copy(update={"adapter": "models:/full-policy@staging"})
    with pytest.raises(UserError, match=r"dpo\.lora\.adapter: models:/full-policy@staging .* no adapter"):
        dpo.run(config.model_copy(update={"lora": no_adapter}), inputs, run_context)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("trainer", ["train_reward_model", "dpo"])
def test_gradient_checkpointing_trains_the_same_weights_in_the_pair_trainers(
    checkpoints: dict[str, str],
    pairs: tuple[str, str],
    run_context: RunContext,
    tmp_path: Path,
    trainer: str,
    lora: Lora | None,
) -> None:
    """(PPO's own test is in test_chat_models.py.) Recomputed activations give the same gradients."""
    results = []
    for recompute in (False, True):
        context = run_context.model_copy(update={"output_root": str(tmp_path / str(recompute))})
        settings = {"batch_size": 8, "learning_rate": 1e-2, "lora": lora, "gradient_checkpointing": recompute}
        if trainer == "dpo":
            inputs = dpo.Inputs(policy=checkpoints["gpt2"], train=pairs[0], eval=pairs[1])
            saved = dpo.run(dpo.Config(**settings), inputs, context).policy
        else:
            rm_inputs = train_reward_model.Inputs(
                base_model=checkpoints["gpt2"], train=pairs[0], eval=pairs[1]
            )
            saved = train_reward_model.run(
                train_reward_model.Config(**settings), rm_inputs, context
            ).reward_model
        results.append(load_file(str(Path(saved) / "model.safetensors")))
    plain, recomputed = results
    assert plain.keys() == recomputed.keys()
    for key, tensor in plain.items():
        assert torch.allclose(tensor, recomputed[key], atol=1e-6), key


def test_a_bf16_checkpoint_trains_float32_adapters_and_is_saved_merged_in_bf16(
    tmp_path: Path, pairs: tuple[str, str], run_context: RunContext
) -> None:
    policy = chat_models.build_checkpoint("mistral", tmp_path / "mistral-bf16", dtype=torch.bfloat16)
    inputs = dpo.Inputs(policy=policy, train=pairs[0], eval=pairs[1])
    outputs = dpo.run(
        dpo.Config(batch_size=8, learning_rate=1e-2, max_length=256, lora=LORA), inputs, run_context
    )
    assert outputs.policy_adapter is not None
    merged = load_file(str(Path(outputs.policy) / "model.safetensors"))
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}, "saved in the input's dtype"
    adapter = load_file(str(Path(outputs.policy_adapter) / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}, "adapters train in float32"
    base = load_file(str(Path(policy) / "model.safetensors"))
    changed = [key for key, tensor in base.items() if not torch.equal(tensor, merged[key])]
    assert changed and all(key.endswith("proj.weight") for key in changed), "only adapted layers moved"


def test_a_reward_model_that_reads_text_its_own_way_gets_a_value_model_of_the_policy(
    checkpoints: dict[str, str],
) -> None:
    """Then the value model cannot share the reward model's base: it is the policy's backbone, frozen, with
    its own adapters and a new head, and the reward model stays a model of its own."""
    inputs = ppo.Inputs(policy=checkpoints["qwen2"], reward_model=checkpoints["llama3"], prompts="unused")
    models = _load_models(inputs, PPO, start_training(PPO, checkpoints["qwen2"], 0, "ppo"))
    assert not models.reward.reads_policy_tokens
    assert models.value_model is not models.reward.model and not has_adapters(models.reward.model)
    assert models.reference is models.policy
    trained = [name for name, p in models.value_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or "modules_to_save" in name for name in trained)
    result = rollout(models)
    assert torch.isfinite(result.scores).all() and torch.isfinite(result.values).all()
    assert torch.equal(result.ref_logprobs, response_logprobs(models.policy, result.batch, 1.0))
