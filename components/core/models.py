"""Model loading from a local directory, `s3://` prefix or `models:/name@alias`, safetensors only.

The same path loads the demo's tiny GPT-2 and a real Hugging Face checkpoint; pickled weights
(`*.bin`, `*.pt`) are never loaded from user storage.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import encode_prompt_response, positions

MODELS_PREFIX = storage.MODELS_PREFIX
REWARD_MEAN_KEY = "rlhf_reward_mean"
REWARD_STD_KEY = "rlhf_reward_std"


def _find_checkpoint(root: Path) -> Path:
    """The directory holding config.json: the root, or inside an MLflow transformers model."""
    if (root / "config.json").is_file():
        return root
    candidates = sorted(p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    if not candidates:
        raise UserError(f"{root}: no Hugging Face checkpoint (config.json + *.safetensors) found")
    return candidates[0]


def _download_registered(uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, alias = uri[len(MODELS_PREFIX) :].partition("@")
    try:
        # Resolve the alias first, so a moved alias never serves a stale cached copy.
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version if alias else None
        pinned = f"{MODELS_PREFIX}{name}/{version}" if version else uri
        server = storage.sha256_hex(mlflow.get_tracking_uri().encode())[:10]
        target = storage.cache_dir() / "models" / server / pinned[len(MODELS_PREFIX) :].replace("/", "_")
        if not target.is_dir():
            with storage.staging_dir(target) as staging:
                mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(staging))
                _merge_mlflow_tokenizer(staging)
    except MlflowException as error:
        raise UserError(f"{uri}: cannot fetch registered model: {error.message}") from None
    return target


def _merge_mlflow_tokenizer(root: Path) -> None:
    """mlflow.transformers keeps the tokenizer apart, in components/tokenizer/; put it beside the weights."""
    for tokenizer_dir in root.rglob("components/tokenizer"):
        checkpoint = tokenizer_dir.parent.parent / "model"
        if (checkpoint / "config.json").is_file():
            for item in tokenizer_dir.iterdir():
                if item.is_file() and not (checkpoint / item.name).exists():
                    shutil.copy2(item, checkpoint / item.name)


def resolve_checkpoint(uri: str) -> Path:
    """A local directory with config.json, tokenizer files and safetensors weights."""
    root = _download_registered(uri) if uri.startswith(MODELS_PREFIX) else storage.local_dir(uri)
    checkpoint = _find_checkpoint(root)
    if not any(checkpoint.glob("*.safetensors")):
        pickled = [p.name for p in checkpoint.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
        hint = f" (found pickled {pickled[0]}; convert it to safetensors)" if pickled else ""
        raise UserError(f"{uri}: no safetensors weights in the checkpoint{hint}")
    return checkpoint


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF needs deterministic forward passes: rollout log-probs must equal training log-probs."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# Python compositions of tanh-GELU (GPT-2's `gelu_new`, `gelu_fast`): a chain of eight elementwise ops each
# way, about 10% of a PPO update on CPU. PyTorch's tanh GELU is the same function in one kernel.
_PYTHON_TANH_GELUS = (NewGELUActivation, FastGELUActivation)


def fuse_activations(model: torch.nn.Module) -> None:
    """Replace Python tanh-GELU modules with the fused kernel. The config is untouched, so a saved checkpoint
    is the same model; outputs change only by float rounding."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) in _PYTHON_TANH_GELUS:
                setattr(module, name, GELUTanh())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(checkpoint: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{checkpoint}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{checkpoint}: the tokenizer has no EOS token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad token equal to EOS makes real EOS tokens look like padding and get masked out of training.
        tokenizer.add_special_tokens({"pad_token": "<|rlhf_pad|>"})
    tokenizer.padding_side = "left"
    return tokenizer


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Room for a pad token added by `load_tokenizer`, and the model told which id it is."""
    if len(tokenizer) > cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def _load(
    auto_class: Any, uri: str, trust_remote_code: bool, device: torch.device | str, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    checkpoint = resolve_checkpoint(uri)
    tokenizer = load_tokenizer(checkpoint, trust_remote_code)
    model = auto_class.from_pretrained(
        checkpoint, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs
    )
    fit_embeddings(model, tokenizer)
    disable_dropout(model)
    fuse_activations(model)
    return model.to(device), tokenizer


def load_policy(
    uri: str, trust_remote_code: bool = False, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _load(AutoModelForCausalLM, uri, trust_remote_code, device)


def load_scalar_model(
    uri: str, trust_remote_code: bool = False, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier with one output: a reward model, or a value model initialised from one."""
    return _load(AutoModelForSequenceClassification, uri, trust_remote_code, device, num_labels=1)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, uri: str) -> None:
    if model.can_generate():  # `generate()` on the saved policy pads with our pad token, never EOS
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as temp:
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        storage.upload_dir(Path(temp), uri)


def scalar_head(model: PreTrainedModel) -> torch.nn.Module:
    """The linear head that maps hidden states to the scalar (named `score` in most HF classifiers)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise UserError(f"{type(model).__name__}: no scalar head (score/classifier) found")


def token_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """The scalar head applied at every position, [batch, seq]: per-token values, or rewards at any index."""
    backbone: Any = model.base_model
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1)


def reward_normalization(model: PreTrainedModel) -> tuple[float, float]:
    return float(getattr(model.config, REWARD_MEAN_KEY, 0.0)), float(
        getattr(model.config, REWARD_STD_KEY, 1.0)
    )


def sequence_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """The raw scalar score read at each row's last real token, [batch]."""
    scores = token_scores(model, input_ids, attention_mask, positions(attention_mask))
    return scores.gather(1, last_index[:, None]).squeeze(1)


def encode_answers(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, index of the last real token) of prompt + response + EOS; see encode_prompt_response."""
    ids, mask, _ = encode_prompt_response(tokenizer, prompts, responses, max_length)
    return ids, mask, mask.sum(-1) - 1


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
) -> torch.Tensor:
    """A scalar model's raw score of each answer to its prompt, read at the EOS, [batch]."""
    ids, mask, last = (t.to(model.device) for t in encode_answers(tokenizer, prompts, responses, max_length))
    return sequence_scores(model, ids, mask, last)


@torch.no_grad()
def fold_reward_normalization(model: PreTrainedModel) -> None:
    """Make the scalar head output normalised rewards itself: w ← w/σ, and b ← (b − μ)/σ where the head has
    a bias. Without a bias its outputs stay off by the constant −μ/σ, which the value loss soon removes."""
    mean, std = reward_normalization(model)
    head = scalar_head(model)
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    weight.div_(std)
    bias: torch.Tensor | None = getattr(head, "bias", None)
    if bias is not None:
        bias.sub_(mean).div_(std)


def normalized_rewards(model: PreTrainedModel, raw: torch.Tensor) -> torch.Tensor:
    """Rewards shifted and scaled so the reference policy's answers score ≈ 0 with unit spread."""
    mean, std = reward_normalization(model)
    return (raw - mean) / std
