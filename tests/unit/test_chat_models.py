"""Real-shaped chat models: GPT-2, Llama 3, Qwen2 (pad ≠ EOS and pad = EOS), GPT-NeoX, Mistral and Gemma, each
tiny and random-init with its family's tokenizer conventions (tests/unit/chat_models.py), through the same
code paths a user's checkpoint takes."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from rlhf_components import dpo, evaluate, generate_candidates, ppo, train_reward_model
from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.config import ModelStep, SamplingConfig
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import decode_responses, sample
from rlhf_components.core.models import load_policy, load_scalar_model, sequence_scores
from rlhf_components.core.records import Message
from rlhf_components.core.tracking import RunContext
from rlhf_components.distributed.collectives import Workers
from rlhf_components.ppo.step import Models, RewardScorer, Rollout, collect_rollout, ppo_kernel, ppo_update

from . import chat_models
from ._helpers import encoded, make_context, write_jsonl

NAMES = list(chat_models.FAMILIES)
CONVERSATION = [
    Message(role="system", content="Be brief."),
    Message(role="user", content="review of the ramen"),
]
PROMPTS: list[str | list[Message]] = [
    "review of the lamp",
    CONVERSATION,
    [
        Message(role="user", content="hello"),
        Message(role="assistant", content="hello"),
        Message(role="user", content="what of the bakery and the very fresh bread"),
    ],
]


# One rollout of PROMPTS and two PPO epochs over it.
UPDATE = ppo.Config(
    rollout_batch_size=3,
    num_minibatches=1,
    ppo_epochs=2,
    learning_rate=1e-3,
    sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
)


def rollout_of(
    policy: PreTrainedModel, reference: PreTrainedModel, scorer: PreTrainedModel, fmt: ChatFormat
) -> Rollout:
    """A seeded rollout of PROMPTS; `scorer` is both the reward model and the value model."""
    models = Models(policy, reference, RewardScorer(scorer, fmt, fmt), scorer, fmt)
    return collect_rollout(
        models, encoded(fmt, PROMPTS), PROMPTS, UPDATE, 0.1, torch.Generator().manual_seed(1)
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("chat-models")
    return {name: chat_models.build_checkpoint(name, root / name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_prompt_ids_are_the_templates_with_the_tokenizers_bos_once(
    checkpoints: dict[str, str], name: str
) -> None:
    family = chat_models.FAMILIES[name]
    _, fmt = load_policy(checkpoints[name])
    tokenizer = fmt.tokenizer
    for prompt in PROMPTS:
        messages = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else [m.model_dump() for m in prompt]
        )
        ids = fmt.prompt_ids(prompt)
        if family.template is None:
            text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
            assert ids == tokenizer(text)["input_ids"]
        else:
            expected = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            assert ids == list(expected)
        bos = tokenizer.bos_token_id
        if family.add_bos:
            assert ids[0] == bos and ids[1] != bos, "BOS is never missing and never doubled"
        else:
            assert not ids or ids[0] != bos or family.bos == family.eos
    # `chat_template: none` reads the text as it is, with the tokenizer's own BOS.
    plain = ChatFormat.of(tokenizer, None, "none")
    assert plain.prompt_ids("review of the lamp") == tokenizer("review of the lamp")["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_every_stop_token_ends_an_answer(checkpoints: dict[str, str], name: str) -> None:
    family = chat_models.FAMILIES[name]
    model, fmt = load_policy(checkpoints[name])
    tokenizer = fmt.tokenizer
    listed = {tokenizer.convert_tokens_to_ids(t) for t in (family.eos, *family.generation_stops)}
    assert listed <= set(fmt.stop_ids)
    if family.turn_end is not None:
        assert tokenizer.convert_tokens_to_ids(family.turn_end) in fmt.stop_ids
    ids, mask = encoded(fmt, PROMPTS)
    for stop in fmt.stop_ids:
        chat_models.force_token(model, stop)
        batch = sample(model, ids, mask, SamplingConfig(greedy=True, max_new_tokens=6), fmt)
        assert batch.ended_with_eos.all()
        assert batch.response_mask.sum(-1).tolist() == [1] * len(PROMPTS)
        assert batch.response_ids[:, 0].tolist() == [stop] * len(PROMPTS)
        assert decode_responses(fmt, batch) == [""] * len(PROMPTS)


def test_a_stop_string_ends_an_answer_at_the_token_that_completes_it(checkpoints: dict[str, str]) -> None:
    model, fmt = load_policy(checkpoints["qwen2"])
    word = fmt.tokenizer.convert_tokens_to_ids("Ġfood")
    chat_models.force_token(model, word)
    ids, mask = encoded(fmt, PROMPTS)
    config = SamplingConfig(greedy=True, max_new_tokens=8, stop_strings=["food food"])
    batch = sample(model, ids, mask, config, fmt)
    assert batch.ended_with_eos.all() and batch.response_mask.sum(-1).tolist() == [2] * len(PROMPTS)
    assert decode_responses(fmt, batch) == [" food food"] * len(PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_a_left_padded_greedy_batch_equals_each_prompt_alone(checkpoints: dict[str, str], name: str) -> None:
    model, fmt = load_policy(checkpoints[name])
    greedy = SamplingConfig(greedy=True, max_new_tokens=6)
    ids, mask = encoded(fmt, PROMPTS)
    assert (mask == 0).any(), "the batch is padded"
    together = sample(model, ids, mask, greedy, fmt)
    for row, prompt in enumerate(PROMPTS):
        alone = sample(model, *encoded(fmt, [prompt]), greedy, fmt)
        n = int(alone.response_mask.sum())
        assert together.response_ids[row, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert torch.allclose(together.logprobs[row, :n], alone.logprobs[0, :n], atol=1e-5)


def test_ppo_is_the_same_with_a_pad_token_and_with_pad_equal_to_eos(checkpoints: dict[str, str]) -> None:
    """Qwen2 pads with <|endoftext|>, not its EOS <|im_end|>; the same model padding with EOS must roll out,
    score and update identically: masks, never the pad id, tell padding from text."""
    config = UPDATE
    results = []
    for pad_is_eos in (False, True):
        policy, fmt = load_policy(checkpoints["qwen2"])
        if pad_is_eos:
            fmt = dataclasses.replace(fmt, pad_id=fmt.stop_ids[0])
        reference, _ = load_policy(checkpoints["qwen2"])
        torch.manual_seed(0)
        scorer, _ = load_scalar_model(checkpoints["qwen2"])
        rollout = rollout_of(policy, reference, scorer, fmt)
        kernel = ppo_kernel(config, policy, scorer, Workers(), iterations=1, checkpoint_uri="unused")
        ppo_update(policy, scorer, kernel, rollout, config, torch.Generator().manual_seed(2))
        results.append((rollout, {k: v.clone() for k, v in policy.state_dict().items()}))
    (first, first_weights), (second, second_weights) = results
    assert first.batch.query_ids.ne(second.batch.query_ids).any(), "the pad ids differ"
    mask = first.batch.response_mask.bool()
    assert torch.equal(first.batch.response_mask, second.batch.response_mask)
    assert torch.equal(first.batch.response_ids[mask], second.batch.response_ids[mask])
    for field in ("scores", "rewards", "advantages", "returns", "values", "ref_logprobs"):
        assert torch.allclose(getattr(first, field), getattr(second, field), atol=1e-5), field
    for key, value in first_weights.items():
        assert torch.allclose(value, second_weights[key], atol=1e-6), key


def test_a_reward_model_of_another_family_scores_the_answers_as_it_alone_would(
    checkpoints: dict[str, str],
) -> None:
    policy, fmt = load_policy(checkpoints["qwen2"])
    torch.manual_seed(0)
    reward_model, reward_fmt = load_scalar_model(checkpoints["llama3"])
    scorer = RewardScorer(reward_model, reward_fmt, fmt)
    assert not scorer.reads_policy_tokens
    batch = sample(
        policy,
        *encoded(fmt, PROMPTS),
        SamplingConfig(max_new_tokens=6),
        fmt,
        torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        scores = scorer(batch, PROMPTS)
        texts = decode_responses(fmt, batch)
        alone = []
        for prompt, text in zip(PROMPTS, texts, strict=True):
            prompt_ids, answer_ids = reward_fmt.answer_ids(prompt, text)
            ids = torch.tensor([prompt_ids + answer_ids])
            alone.append(
                sequence_scores(reward_model, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))
            )
    assert torch.allclose(scores, torch.cat(alone), atol=1e-5)


def _pairs(root: Path, count: int) -> str:
    """Preference pairs in every prompt shape, TRL's conversational answers among them."""
    rows = []
    for index in range(count):
        prompt = PROMPTS[index % len(PROMPTS)]
        chosen, rejected = f"the food was great {index}", f"awful bland {index}"
        if isinstance(prompt, str):
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append(
                {
                    "prompt": [m.model_dump() for m in prompt],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return str(write_jsonl(root / "pairs.jsonl", rows))


def _prompts(root: Path) -> str:
    rows = [{"prompt": p} if isinstance(p, str) else {"prompt": [m.model_dump() for m in p]} for p in PROMPTS]
    return str(write_jsonl(root / "prompts.jsonl", rows * 2))


def _vocabulary(checkpoint: str) -> tuple[int, dict[str, int]]:
    weights = load_file(str(next(Path(checkpoint).glob("*.safetensors"))))
    rows = {v.shape[0] for k, v in weights.items() if "embed" in k or k.endswith("wte.weight")}
    _, fmt = load_policy(checkpoint)
    return max(rows), fmt.tokenizer.get_vocab()


def _run_steps(policy: str, reward_base: str, root: Path, context: RunContext) -> dict[str, str]:
    """generate_candidates → train_reward_model → ppo → evaluate, and dpo, at tiny sizes."""
    prompts, pairs = _prompts(root), _pairs(root, 12)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    candidates = generate_candidates.run(
        generate_candidates.Config(sampling=sampling),
        generate_candidates.Inputs(policy=policy, prompts=prompts, inbox=str(root / "inbox")),
        context,
    )
    assert candidates.num_candidates == 2 * 2 * len(PROMPTS)
    reward = train_reward_model.run(
        train_reward_model.Config(batch_size=4, learning_rate=1e-3, base=reward_base),
        train_reward_model.Inputs(train=pairs, eval=pairs),
        context,
    )
    trained = ppo.run(
        ppo.Config(
            total_episodes=6,
            rollout_batch_size=3,
            num_minibatches=1,
            ppo_epochs=1,
            learning_rate=1e-3,
            sampling=sampling,
        ),
        ppo.Inputs(policy=policy, reward_model=reward.reward_model, prompts=prompts),
        context,
    )
    evaluated = evaluate.run(
        evaluate.Config(
            max_prompts=6,
            bootstrap_samples=100,
            sampling=sampling.model_copy(update={"greedy": True}),
            kl_sampling=sampling,
        ),
        evaluate.Inputs(
            candidate=trained.policy, reference=policy, reward_model=reward.reward_model, prompts=prompts
        ),
        context,
    )
    assert {"rm_win_rate", "kl", "eos_rate"} <= set(evaluated.metrics)
    preferred = dpo.run(
        dpo.Config(batch_size=4, learning_rate=1e-3),
        dpo.Inputs(policy=policy, train=pairs, eval=pairs),
        context,
    )
    return {"ppo": trained.policy, "dpo": preferred.policy, "reward_model": reward.reward_model}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_step_runs_and_no_vocabulary_changes(
    checkpoints: dict[str, str], name: str, tmp_path: Path
) -> None:
    context = make_context(tmp_path / "run")
    outputs = _run_steps(checkpoints[name], checkpoints[name], tmp_path, context)
    base = _vocabulary(checkpoints[name])
    for step in ("ppo", "dpo"):
        assert _vocabulary(outputs[step]) == base, step


@pytest.mark.slow
def test_a_qwen2_policy_learns_from_a_llama_reward_model(checkpoints: dict[str, str], tmp_path: Path) -> None:
    """The reward model is trained on Llama's backbone and reads answers its own way; PPO re-encodes them for
    it and starts the value model from the policy."""
    outputs = _run_steps(
        checkpoints["qwen2"], checkpoints["llama3"], tmp_path, make_context(tmp_path / "run")
    )
    assert json.loads((Path(outputs["reward_model"]) / "config.json").read_text())["model_type"] == "llama"
    assert _vocabulary(outputs["ppo"]) == _vocabulary(checkpoints["qwen2"])


@pytest.mark.slow
def test_bfloat16_in_bfloat16_out(tmp_path: Path) -> None:
    """A bf16 checkpoint trains with float32 master weights under bf16 autocast and is saved in bf16."""
    policy = chat_models.build_checkpoint("llama3", tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((Path(policy) / "config.json").read_text())["dtype"] == "bfloat16"
    outputs = _run_steps(policy, policy, tmp_path, make_context(tmp_path / "run"))
    for step in ("ppo", "dpo", "reward_model"):
        weights = load_file(str(Path(outputs[step]) / "model.safetensors"))
        assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}, step
        assert json.loads((Path(outputs[step]) / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_policy(outputs["ppo"], ModelStep())[0].dtype == torch.bfloat16


def test_a_jinja_file_is_the_template_and_a_missing_one_is_a_user_error(
    checkpoints: dict[str, str], tmp_path: Path
) -> None:
    _, fmt = load_policy(checkpoints["gpt2"])
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:{% endif %}",
        encoding="utf-8",
    )
    step = ModelStep(chat_template=str(template))
    _, templated = load_policy(checkpoints["gpt2"], step)
    expected = fmt.tokenizer("### system: Be brief.\n### user: review of the ramen\n### assistant:")[
        "input_ids"
    ]
    assert templated.prompt_ids(CONVERSATION) == expected
    with pytest.raises(UserError, match=r"missing\.jinja"):
        load_policy(checkpoints["gpt2"], ModelStep(chat_template=str(tmp_path / "missing.jinja")))


def test_gradient_checkpointing_takes_the_same_ppo_step(checkpoints: dict[str, str]) -> None:
    config = UPDATE
    policy, fmt = load_policy(checkpoints["llama3"])
    torch.manual_seed(0)
    value, _ = load_scalar_model(checkpoints["llama3"])
    rollout = rollout_of(policy, policy, value, fmt)
    weights = []
    for recompute in (False, True):
        trained, _ = load_policy(checkpoints["llama3"])
        trained_value = copy.deepcopy(value)
        settings = config.model_copy(update={"gradient_checkpointing": recompute})
        kernel = ppo_kernel(
            settings, trained, trained_value, Workers(), iterations=1, checkpoint_uri="unused"
        )
        assert trained.is_activation_checkpointing == recompute
        ppo_update(trained, trained_value, kernel, rollout, settings, torch.Generator().manual_seed(2))
        weights.append(trained.state_dict())
    for key, value_tensor in weights[0].items():
        assert torch.allclose(value_tensor, weights[1][key], atol=1e-6), key
    assert not torch.equal(
        weights[0]["model.embed_tokens.weight"], policy.state_dict()["model.embed_tokens.weight"]
    )
