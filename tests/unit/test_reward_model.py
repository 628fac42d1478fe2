"""train_reward_model: the Bradley–Terry loss, last-token encoding, and a tiny model that learns sentiment."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from rlhf_components import train_reward_model
from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.errors import UserError
from rlhf_components.core.losses import bradley_terry_loss
from rlhf_components.core.models import (
    REWARD_MEAN_KEY,
    REWARD_STD_KEY,
    fold_reward_normalization,
    load_scalar_model,
    load_tokenizer,
    normalized_rewards,
    reward_normalization,
    score_texts,
)
from rlhf_components.core.tracking import RunContext
from rlhf_components.demo import DemoAssets

from ._helpers import child_runs, make_context, read_jsonl, sentiment_pairs, write_jsonl

CHOSEN = [1.25, -0.5, 2.0, 0.3, -3.0, 0.0]
REJECTED = [0.2, 0.4, -1.0, 0.3, 1.5, -0.7]


def _reference_loss(chosen: list[float], rejected: list[float], margin: float, center: float) -> float:
    """−log σ(r_c − r_r − m), averaged, + c·mean((r_c + r_r)²), in float64 with the math module."""
    terms = [math.log1p(math.exp(-(c - r - margin))) for c, r in zip(chosen, rejected, strict=True)]
    loss = sum(terms) / len(terms)
    if center > 0:
        loss += center * sum((c + r) ** 2 for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    return loss


@pytest.mark.parametrize(("margin", "center"), [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (1.0, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bradley_terry_loss_matches_the_formula(margin: float, center: float, dtype: torch.dtype) -> None:
    loss = bradley_terry_loss(
        torch.tensor(CHOSEN, dtype=dtype),
        torch.tensor(REJECTED, dtype=dtype),
        margin=margin,
        center_coef=center,
    )
    assert loss.shape == ()
    assert float(loss) == pytest.approx(_reference_loss(CHOSEN, REJECTED, margin, center), abs=1e-6)


def test_bradley_terry_gradient() -> None:
    """d/dr_c of the mean loss is −(1 − σ(r_c − r_r − m)) / n, and the opposite for r_r."""
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(chosen, rejected, margin=0.5).backward()
    n = len(CHOSEN)
    for i, (c, r) in enumerate(zip(CHOSEN, REJECTED, strict=True)):
        expected = -(1.0 - 1.0 / (1.0 + math.exp(-(c - r - 0.5)))) / n
        assert chosen.grad is not None and rejected.grad is not None
        assert float(chosen.grad[i]) == pytest.approx(expected, abs=1e-12)
        assert float(rejected.grad[i]) == pytest.approx(-expected, abs=1e-12)
    # A wider score gap always lowers the loss; a tie costs exactly log 2.
    assert float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))) == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])) < bradley_terry_loss(
        torch.tensor([1.0]), torch.tensor([0.0])
    )


def test_answers_end_with_the_stop_token_and_right_pad(tiny_assets: DemoAssets) -> None:
    fmt = ChatFormat.of(load_tokenizer(Path(tiny_assets.sft_model_dir)))
    tokenizer = fmt.tokenizer
    eos, pad = tokenizer.eos_token_id, fmt.pad_id
    assert pad != eos
    prompts = ["Review of the diner downtown:", "My review of the blender I bought last month:", "Hi"]
    responses = [" The food was great.", " It was okay and the price was fine. It did the job.", ""]
    ids, mask, answer_mask = fmt.answers(prompts, responses)
    assert ids.shape == mask.shape == answer_mask.shape
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        length = len(prompt_ids) + len(response_ids) + 1
        assert int(mask[row].sum()) - 1 == length - 1
        assert ids[row, :length].tolist() == [*prompt_ids, *response_ids, eos]
        assert mask[row, :length].tolist() == [1] * length
        assert mask[row, length:].sum() == 0
        assert answer_mask[row].tolist() == [0] * len(prompt_ids) + [1] * (length - len(prompt_ids)) + [0] * (
            ids.shape[1] - length
        )
        assert ids[row, length:].tolist() == [pad] * (ids.shape[1] - length)
    assert int(mask.sum(-1).max()) == ids.shape[1], "the longest row has no padding"
    assert (ids[mask.bool()] != pad).all(), "pad never appears among real tokens"


@dataclass(frozen=True)
class Trained:
    outputs: train_reward_model.Outputs
    train: Path
    eval: Path
    context: RunContext


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_assets: DemoAssets) -> Trained:
    """96 easy pairs, 3 epochs at a learning rate that suits a 32-wide model (a few seconds)."""
    root = tmp_path_factory.mktemp("reward-model")
    context = make_context(root)
    train = write_jsonl(root / "train.jsonl", sentiment_pairs(96, seed=1))
    evaluation = write_jsonl(root / "eval.jsonl", sentiment_pairs(40, seed=2))
    config = train_reward_model.Config(epochs=3, learning_rate=3e-3, batch_size=16, max_length=64)
    outputs = train_reward_model.run(
        config,
        train_reward_model.Inputs(
            base_model=tiny_assets.sft_model_dir, train=str(train), eval=str(evaluation)
        ),
        context,
    )
    return Trained(outputs, train, evaluation, context)


def test_tiny_reward_model_learns_easy_preferences(trained: Trained) -> None:
    outputs = trained.outputs
    assert outputs.num_train_pairs == 96
    assert outputs.eval_accuracy >= 0.8
    assert outputs.train_accuracy >= 0.8

    # The saved checkpoint scores the held-out pairs the same way (reloaded, independently).
    model, fmt = load_scalar_model(outputs.reward_model)
    model.eval()
    pairs = read_jsonl(trained.eval)
    prompts = [p["prompt"] for p in pairs]
    with torch.no_grad():
        chosen = score_texts(model, fmt, prompts, [p["chosen"] for p in pairs])
        rejected = score_texts(model, fmt, prompts, [p["rejected"] for p in pairs])
    accuracy = (chosen > rejected).float().mean().item()
    assert accuracy == pytest.approx(outputs.eval_accuracy, abs=1e-6)


def test_checkpoint_is_safetensors_with_normalization(trained: Trained) -> None:
    outputs = trained.outputs
    checkpoint = Path(outputs.reward_model)
    assert (checkpoint / "model.safetensors").is_file()
    assert not list(checkpoint.glob("*.bin")) and not list(checkpoint.glob("*.pt"))
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert isinstance(config[REWARD_MEAN_KEY], float)
    assert config[REWARD_STD_KEY] > 0
    assert len(config["id2label"]) == 1, "one scalar output"

    model, fmt = load_scalar_model(outputs.reward_model)
    model.eval()
    assert reward_normalization(model) == (config[REWARD_MEAN_KEY], config[REWARD_STD_KEY])
    pairs = read_jsonl(trained.train)
    prompts = [p["prompt"] for p in pairs]
    with torch.no_grad():
        raw = torch.cat(
            [
                score_texts(model, fmt, prompts, [p["chosen"] for p in pairs]),
                score_texts(model, fmt, prompts, [p["rejected"] for p in pairs]),
            ]
        )
    rewards = normalized_rewards(model, raw)
    assert abs(rewards.mean().item()) < 0.1
    assert rewards.std().item() == pytest.approx(1.0, abs=0.05)
    # Normalisation is a shift and a scale: it keeps every preference's direction.
    n = len(pairs)
    assert torch.equal(rewards[:n] > rewards[n:], raw[:n] > raw[n:])

    # PPO's value model starts from this checkpoint with the normalisation folded into its head: it
    # predicts on the rewards' scale (a bias-free head keeps the constant offset −μ/σ).
    value_model, _ = load_scalar_model(outputs.reward_model)
    fold_reward_normalization(value_model)
    with torch.no_grad():
        values = score_texts(value_model, fmt, prompts, [p["chosen"] for p in pairs])
    mean, std = reward_normalization(model)
    assert std != pytest.approx(1.0)
    assert torch.allclose(values, rewards[:n] + mean / std, atol=1e-5)


def test_training_is_tracked(trained: Trained) -> None:
    outputs = trained.outputs
    [run] = child_runs(trained.context, "train_reward_model")
    metrics = run.data.metrics
    assert metrics["eval_accuracy"] == pytest.approx(outputs.eval_accuracy)
    assert metrics["train_accuracy"] == pytest.approx(outputs.train_accuracy)
    assert run.data.params["learning_rate"] == "0.003"
    losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 3 * 96 // 16
    assert sum(losses[-3:]) < sum(losses[:3]), "the loss goes down"
    rates = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "learning_rate")]
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.0), "LR annealed to zero"


def test_empty_training_set_is_a_user_error(tmp_path: Path, tiny_assets: DemoAssets) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="no training pairs"):
        train_reward_model.run(
            train_reward_model.Config(),
            train_reward_model.Inputs(
                base_model=tiny_assets.sft_model_dir, train=str(empty), eval=str(empty)
            ),
            make_context(tmp_path),
        )


def test_a_pretrained_reward_model_is_scored_on_the_pairs_and_passed_on_untrained(
    trained: Trained, tmp_path: Path
) -> None:
    context = make_context(tmp_path)
    outputs = train_reward_model.run(
        train_reward_model.Config(batch_size=16, max_length=64),
        train_reward_model.Inputs(
            pretrained=trained.outputs.reward_model, train=str(trained.train), eval=str(trained.eval)
        ),
        context,
    )
    assert outputs.trained is False and outputs.reward_model == trained.outputs.reward_model
    assert outputs.eval_accuracy == pytest.approx(trained.outputs.eval_accuracy, abs=1e-6)
    assert outputs.num_train_pairs == 96
    assert not (Path(context.output_root) / context.parent_run_id / "train_reward_model").exists()
    [run] = child_runs(context, "train_reward_model")
    assert run.data.metrics["eval_accuracy"] == pytest.approx(outputs.eval_accuracy)
    with pytest.raises(UserError, match="no backbone to train"):
        train_reward_model.run(
            train_reward_model.Config(), train_reward_model.Inputs(train="t", eval="e"), context
        )
