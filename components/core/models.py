"""Model loading from a local directory, `s3://` prefix or `models:/name@alias`, safetensors only.

The same path loads the demo's tiny GPT-2 and a real Hugging Face checkpoint; pickled weights
(`*.bin`, `*.pt`) are never loaded from user storage.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.config import ModelStep
from rlhf_components.core.errors import UserError
from rlhf_components.core.generation import positions
from rlhf_components.core.records import Prompt

log = logging.getLogger(__name__)

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
        server = storage.sha256_hex(mlflow.get_registry_uri().encode())[:10]
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
    """The checkpoint's tokenizer as it is: no token is ever added (see core.chat for padding)."""
    if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{checkpoint}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the checkpoint")
    if trust_remote_code:
        log.warning("%s: trust_remote_code is on: the checkpoint's own Python code runs here", checkpoint)
    return AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (float32 when its config names none)."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def compute_dtype(uri: str, step: ModelStep) -> torch.dtype:
    """The dtype a step computes and saves in: `step.dtype`, or under `auto` the checkpoint's own."""
    return DTYPES[step.dtype] if step.dtype != "auto" else checkpoint_dtype(resolve_checkpoint(uri))


def _load(
    auto_class: Any,
    uri: str,
    step: ModelStep,
    device: torch.device | str,
    dtype: torch.dtype | None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, ChatFormat]:
    checkpoint = resolve_checkpoint(uri)
    tokenizer = load_tokenizer(checkpoint, step.trust_remote_code)
    model = auto_class.from_pretrained(
        checkpoint,
        use_safetensors=True,
        trust_remote_code=step.trust_remote_code,
        dtype=dtype or compute_dtype(uri, step),
        **kwargs,
    )
    disable_dropout(model)
    fuse_activations(model)
    generation_config = model.generation_config if model.can_generate() else None
    return model.to(device), ChatFormat.of(tokenizer, generation_config, step.chat_template)


def load_policy(
    uri: str,
    step: ModelStep | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, ChatFormat]:
    """A causal LM and how it reads prompts; weights in `dtype`, else in the step's compute dtype (a trainer
    keeps the weights it trains in float32)."""
    return _load(AutoModelForCausalLM, uri, step or ModelStep(), device, dtype)


def load_scalar_model(
    uri: str,
    step: ModelStep | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, ChatFormat]:
    """A sequence classifier with one output: a reward model, or a value model initialised from one."""
    return _load(AutoModelForSequenceClassification, uri, step or ModelStep(), device, dtype, num_labels=1)


def save_checkpoint(
    model: PreTrainedModel, fmt: ChatFormat, uri: str, dtype: torch.dtype | None = None
) -> None:
    """The model (cast to `dtype`, the input's, when given) and its tokenizer, as it was loaded."""
    if dtype is not None:
        torch.nn.Module.to(model, dtype)  # PreTrainedModel.to's typing hides the dtype overload
    if model.can_generate():  # `generate()` on the saved policy pads as we did
        model.generation_config.pad_token_id = fmt.pad_id
    with tempfile.TemporaryDirectory() as temp:
        model.save_pretrained(temp, safe_serialization=True)
        fmt.tokenizer.save_pretrained(temp)
        storage.upload_dir(Path(temp), uri)


SCALAR_HEADS = ("score", "classifier")


def scalar_head_name(model: PreTrainedModel) -> str | None:
    """The attribute holding a scalar model's head (`score` in most HF classifiers); None in a causal LM."""
    heads = (name for name in SCALAR_HEADS if isinstance(getattr(model, name, None), torch.nn.Module))
    return next(heads, None)


def scalar_head(model: PreTrainedModel, trained: bool = False) -> torch.nn.Module:
    """The head that maps hidden states to the scalar, as the model applies it; with `trained`, the module
    whose weights train (under LoRA the head applied is a wrapper around the original and a trained copy)."""
    name = scalar_head_name(model)
    if name is None:
        raise UserError(f"{type(model).__name__}: no scalar head ({'/'.join(SCALAR_HEADS)}) found")
    head: torch.nn.Module = getattr(model, name)
    copies = getattr(head, "modules_to_save", None)
    return copies["default"] if trained and isinstance(copies, torch.nn.ModuleDict) else head


@torch.no_grad()
def init_scalar_head(model: PreTrainedModel) -> None:
    """A new scalar head, N(0, 1/sqrt(d+1)) with a zero bias, drawn on the CPU from torch's RNG, so it is the
    same whatever device the model later moves to."""
    head = scalar_head(model, trained=True)
    weight, bias = head.weight, getattr(head, "bias", None)
    assert isinstance(weight, torch.Tensor)
    weight.normal_(0.0, 1.0 / math.sqrt(model.config.hidden_size + 1))
    if isinstance(bias, torch.Tensor):
        bias.zero_()


def token_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """The scalar head applied at every position, [batch, seq] in float32: per-token values, or rewards at any
    index."""
    backbone: Any = model.base_model
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


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


def score_texts(
    model: PreTrainedModel, fmt: ChatFormat, prompts: Sequence[Prompt], responses: Sequence[str]
) -> torch.Tensor:
    """A scalar model's raw score of each answer to its prompt, read at the answer's stop token, [batch]."""
    ids, mask, _ = (t.to(model.device) for t in fmt.answers(prompts, responses))
    return sequence_scores(model, ids, mask, mask.sum(-1) - 1)


def score_in_batches(
    model: PreTrainedModel,
    fmt: ChatFormat,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    batch_size: int,
) -> torch.Tensor:
    """score_texts over `batch_size` answers at a time, gathered on the CPU, [len(responses)]."""
    parts = [
        score_texts(model, fmt, prompts[i : i + batch_size], responses[i : i + batch_size]).cpu()
        for i in range(0, len(responses), batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def fold_reward_normalization(model: PreTrainedModel) -> None:
    """Make the scalar head output normalised rewards itself: w ← w/σ, and b ← (b − μ)/σ where the head has
    a bias. Without a bias its outputs stay off by the constant −μ/σ, which the value loss soon removes."""
    mean, std = reward_normalization(model)
    head = scalar_head(model, trained=True)
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
