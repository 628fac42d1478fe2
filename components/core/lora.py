"""LoRA adapters (peft, through transformers' own adapter support) on the models a trainer trains.

With `lora:` in a trainer's config the base weights load in the compute dtype and stay frozen; only the
adapters, and a scalar model's head, train (in float32, as master weights). A frozen role can then share the
base: with its adapters disabled the policy is its own reference, and in PPO the value model's backbone is
the reward model. One copy of each base is in memory.

A trainer with LoRA writes two results: the merged checkpoint (adapters folded into the base weights, saved
in the input's dtype: what evaluate and the registry load) and the adapter alone (`adapter_config.json` +
`adapter_model.safetensors`), which register_and_promote logs beside the registered model and a later run
can continue from (`lora.adapter`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from transformers import PreTrainedModel

from rlhf_components.core import storage
from rlhf_components.core.chat import ChatFormat
from rlhf_components.core.errors import UserError
from rlhf_components.core.models import save_checkpoint, scalar_head_name
from rlhf_components.core.trainer_config import Lora, TrainedPolicy

log = logging.getLogger(__name__)

ADAPTER_TAG = "rlhf.adapter"
"""the model-version tag that holds the artifact URI of the adapter a registered model was merged from"""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""peft's saved adapters name tensors as inside a PeftModel; loadable so by peft, vLLM and others"""


def add_adapters(model: PreTrainedModel, lora: Lora, section: str) -> None:
    """Adapters on `model` (new ones per `lora`, or the saved `lora.adapter`), and a scalar model's head
    trained whole beside them: its original stays, for use while the adapters are disabled. Everything else
    is frozen; what trains is float32."""
    head = scalar_head_name(model)
    saved = resolve_adapter(lora.adapter, section) if lora.adapter is not None else None
    config = (
        _saved_config(saved, lora, section, head)
        if saved is not None
        else LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear" if lora.target_modules == "auto" else lora.target_modules,
            modules_to_save=[head] if head else None,
        )
    )
    with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft says it transposes them, as it must
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        try:
            model.add_adapter(config)
        except ValueError as error:
            raise UserError(f"{section}.lora.target_modules: {error}") from None
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trained:
        parameter.data = parameter.data.float()
    if saved is not None:
        _copy_saved_weights(model, saved, section)
        log.info("%s: continuing from the adapter at %s", section, lora.adapter)
    total = sum(parameter.numel() for parameter in model.parameters())
    count = sum(parameter.numel() for parameter in trained)
    log.info(
        "%s: LoRA rank %d on %s: %d of %d parameters train (%.2f%%)",
        section,
        config.r,
        type(model).__name__,
        count,
        total,
        100 * count / total,
    )


def _saved_config(where: Path, lora: Lora, section: str, head: str | None) -> LoraConfig:
    """The saved adapter's own config, which must agree with `lora` on what it sets."""
    config = LoraConfig.from_pretrained(str(where))
    for field, value in (("rank", config.r), ("alpha", config.lora_alpha), ("dropout", config.lora_dropout)):
        if value != getattr(lora, field):
            raise UserError(
                f"{section}.lora.{field}: {getattr(lora, field)}, but the adapter at {lora.adapter} was "
                f"trained with {value}: set it to match"
            )
    if (head is not None) != bool(config.modules_to_save):
        kind = "scalar (reward or value) model" if head else "policy"
        raise UserError(f"{section}.lora.adapter: {lora.adapter} is not an adapter of a {kind}")
    return config


def _copy_saved_weights(model: PreTrainedModel, where: Path, section: str) -> None:
    """The saved adapter's tensors into the new adapters. (transformers' `load_adapter` would do this too,
    but leaves a key renaming behind that a later `save_pretrained` of the merged model applies.)"""
    current = model.get_adapter_state_dict()  # views of the adapters' parameters
    stored = load_file(str(where / ADAPTER_WEIGHTS))
    saved = {key.removeprefix(PEFT_KEY_PREFIX): tensor for key, tensor in stored.items()}
    if saved.keys() != current.keys():
        missing = sorted(current.keys() - saved.keys())[:3]
        raise UserError(
            f"{section}.lora.adapter: {where / ADAPTER_WEIGHTS} does not fit this model (missing "
            f"{', '.join(missing) or 'nothing'}; {len(saved.keys() - current.keys())} unknown tensors)"
        )
    with torch.no_grad():
        for key, tensor in current.items():
            tensor.copy_(saved[key])


def resolve_adapter(uri: str, section: str) -> Path:
    """A local directory holding a saved adapter: `uri` itself (local or s3://), or for models:/name@alias
    (or /version) the adapter logged beside that registered model."""
    if uri.startswith(storage.MODELS_PREFIX):
        uri = _registered_adapter(uri, section)
    where = storage.local_dir(uri)
    if not (where / ADAPTER_CONFIG).is_file():
        raise UserError(f"{section}.lora.adapter: {uri}: no {ADAPTER_CONFIG}; not a saved adapter")
    return where


def _registered_adapter(uri: str, section: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, alias = uri[len(storage.MODELS_PREFIX) :].partition("@")
    client = mlflow.MlflowClient()
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        artifact = version.tags.get(ADAPTER_TAG)
        if artifact is None:
            raise UserError(
                f"{section}.lora.adapter: {uri} (version {version.version}) was not trained with LoRA: "
                "it has no adapter"
            )
        target = storage.cache_dir() / "adapters" / storage.sha256_hex(artifact.encode())[:16]
        if not target.is_dir():
            with storage.staging_dir(target) as staging:
                mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=str(staging))
    except MlflowException as error:
        raise UserError(f"{section}.lora.adapter: cannot fetch {uri}: {error.message}") from None
    found = sorted(target.rglob(ADAPTER_CONFIG))
    return str(found[0].parent if found else target)


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """`model` computes as its base inside the block: adapters off, a scalar head back to its original.
    (transformers' `enable_adapters` does not switch a head back on, so both ways are done here.)"""
    switches = [m for m in model.modules() if isinstance(m, BaseTunerLayer | ModulesToSaveWrapper)]
    for module in switches:
        module.enable_adapters(False)
    try:
        yield
    finally:
        for module in switches:
            module.enable_adapters(True)


def save_adapter(model: PreTrainedModel, uri: str, base_uri: str) -> None:
    """The adapter alone (with a scalar model's trained head), recording `base_uri` as the model it adapts."""
    with tempfile.TemporaryDirectory() as temp:
        model.save_pretrained(temp, safe_serialization=True)  # with adapters: only the adapter is written
        config_path = Path(temp, ADAPTER_CONFIG)
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(
            json.dumps({**config, "base_model_name_or_path": base_uri}, indent=2), encoding="utf-8"
        )
        storage.upload_dir(Path(temp), uri)


@torch.no_grad()
def merge_adapters(model: PreTrainedModel) -> None:
    """Fold the adapters into the base weights and drop them (a scalar head becomes its trained copy), in
    place: `model` is then a plain checkpoint that computes what the adapted model did."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            replacement = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            replacement = module.modules_to_save["default"]
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
    model.peft_config = {}
    model._hf_peft_config_loaded = False


def save_policy(
    policy: PreTrainedModel, fmt: ChatFormat, outputs: TrainedPolicy, base_uri: str, dtype: torch.dtype
) -> None:
    """A policy trainer's result: under LoRA first the adapter alone, then the adapters merged in; the policy
    saved in `dtype` (the input's)."""
    save_and_merge(policy, outputs.policy_adapter, base_uri)
    save_checkpoint(policy, fmt, outputs.policy, dtype)


def save_and_merge(model: PreTrainedModel, adapter_uri: str | None, base_uri: str) -> None:
    """Under LoRA (`adapter_uri` set): the adapter alone at `adapter_uri`, then the adapters merged into
    `model`, which the trainer saves as its checkpoint."""
    if adapter_uri is not None:
        save_adapter(model, adapter_uri, base_uri)
        merge_adapters(model)
