"""Checkpoints on S3 and the model registry (aliases, promotion history, rollback) on a real MLflow server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import transformers

from rlhf_components.core import storage
from rlhf_components.core.errors import UserError
from rlhf_components.core.models import load_policy, resolve_checkpoint, save_checkpoint
from rlhf_components.demo import DemoAssets
from rlhf_components.register_and_promote import registry

from .conftest import MlflowServer, S3Server, restored_mlflow_state

pytestmark = pytest.mark.integration

# Pinned explicitly: without pip_requirements, mlflow tries to infer them and fails offline (DESIGN §5).
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, tensor in state_a.items():
        assert torch.equal(tensor, state_b[key]), key


@pytest.fixture
def server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    # registry.* and models.* use the process-global client; the autouse fixture restores the URI afterwards.
    # The registry URI is left unset on purpose: it then follows the tracking URI, and nothing leaks.
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer, tiny_assets: DemoAssets) -> Iterator[tuple[str, list[str], Any]]:
    """One registered model with two versions of the tiny SFT policy, logged the way the pipeline step does.

    Module-scoped: logging a transformers model is the slow part, and every test below only reads versions
    or moves aliases on its own copy of the name.
    """
    name = f"it-policy-{uuid.uuid4().hex[:8]}"
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    versions: list[str] = []
    with restored_mlflow_state():
        mlflow.set_tracking_uri(mlflow_server.url)
        mlflow.set_experiment(f"it-registry-{uuid.uuid4().hex[:8]}")
        for _ in range(2):
            with mlflow.start_run():
                info = mlflow.transformers.log_model(
                    transformers_model={"model": model, "tokenizer": fmt.tokenizer},
                    name="policy",
                    task="text-generation",
                    pip_requirements=PIP_REQUIREMENTS,
                    registered_model_name=name,
                )
            versions.append(info.registered_model_version)
    yield name, versions, model


def test_s3_checkpoint_round_trip(s3_server: S3Server, tiny_assets: DemoAssets) -> None:
    model, fmt = load_policy(tiny_assets.sft_model_dir)
    tokenizer = fmt.tokenizer
    uri = s3_server.uri(f"checkpoints-{uuid.uuid4().hex[:8]}", "sft")
    save_checkpoint(model, fmt, uri)

    names = {f.rsplit("/", 1)[1] for f in storage.list_files(uri + "/")}
    assert "config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt")) for n in names)  # never pickled weights

    loaded, loaded_fmt = load_policy(uri)
    loaded_tokenizer = loaded_fmt.tokenizer
    _same_weights(model, loaded)
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded_tokenizer("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]


def test_registered_versions_are_strings(
    server: MlflowServer, registered: tuple[str, list[str], Any]
) -> None:
    name, versions, _ = registered
    # The server returns "1", a local store 1: the project normalises to str everywhere.
    assert versions == ["1", "2"]
    assert all(isinstance(v, str) for v in versions)
    registry.set_alias(name, versions[0], "staging", "first candidate")
    found = registry.alias_version(name, "staging")
    assert found == "1"
    assert isinstance(found, str)
    assert registry.alias_version(name, "production") is None


def test_resolve_and_load_a_registered_alias(
    server: MlflowServer, registered: tuple[str, list[str], Any]
) -> None:
    name, versions, model = registered
    registry.set_alias(name, versions[1], "staging", "candidate under test")
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(name, "staging").version == "2"
    assert client.get_model_version(name, "2").tags["rlhf.staging.decision"].endswith("candidate under test")

    checkpoint = resolve_checkpoint(f"models:/{name}@staging")
    assert checkpoint.is_dir()
    assert (checkpoint / "config.json").is_file()
    assert list(checkpoint.glob("*.safetensors"))
    assert checkpoint.is_relative_to(storage.cache_dir())
    registry_key = storage.sha256_hex(mlflow.get_registry_uri().encode())[:10]
    assert checkpoint.relative_to(storage.cache_dir() / "models").parts[0] == registry_key

    loaded, _ = load_policy(f"models:/{name}@staging")
    _same_weights(model, loaded)


def test_registered_alias_loads_the_logged_tokenizer(
    server: MlflowServer, registered: tuple[str, list[str], Any], tiny_assets: DemoAssets
) -> None:
    name, versions, _ = registered
    uris = (tiny_assets.sft_model_dir, f"models:/{name}/{versions[0]}")
    expected, loaded = (load_policy(uri)[1].tokenizer for uri in uris)
    assert len(loaded) == len(expected)
    assert loaded("good movie")["input_ids"] == expected("good movie")["input_ids"]


def _copy_versions(source_name: str, count: int) -> str:
    """A new registered model whose versions reuse version 1's artifacts: registry moves, no re-logging."""
    client = mlflow.MlflowClient()
    source = client.get_model_version(source_name, "1")
    name = f"it-copy-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    # MLflow 3 sources look like models:/m-<id>; the server only accepts them with the matching model_id,
    # which a version read back over REST does not always carry.
    assert source.source is not None
    model_id = source.model_id or source.source.removeprefix("models:/")
    for _ in range(count):
        client.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id)
    return name


def test_rollback_moves_the_legacy_stage_too(
    server: MlflowServer, registered: tuple[str, list[str], Any]
) -> None:
    name = _copy_versions(registered[0], 2)
    registry.promote(name, "1", "production")
    registry.promote(name, "2", "production")
    registry.rollback(name)
    client = mlflow.MlflowClient()
    assert client.get_model_version(name, "1").current_stage == "Production"
    assert client.get_model_version(name, "2").current_stage != "Production"


def test_repromoting_the_current_version_keeps_rollback_meaningful(
    server: MlflowServer, registered: tuple[str, list[str], Any]
) -> None:
    name = _copy_versions(registered[0], 2)
    registry.promote(name, "1", "production")
    registry.promote(name, "2", "production")
    registry.promote(name, "2", "production", reason="promoted again by hand")
    assert registry.rollback(name) == ("2", "1")
    assert registry.alias_version(name, "production") == "1"


def test_promote_twice_then_rollback(server: MlflowServer, registered: tuple[str, list[str], Any]) -> None:
    name, versions, _ = registered
    registry.promote(name, versions[0], "production", reason="first release")
    assert registry.alias_version(name, "production") == "1"
    registry.promote(name, versions[1], "production", reason="better win rate")
    assert registry.alias_version(name, "production") == "2"
    assert registry.production_history(name) == ["1", "2"]

    assert registry.rollback(name) == ("2", "1")
    assert registry.alias_version(name, "production") == "1"
    assert registry.production_history(name) == ["1"]
    client = mlflow.MlflowClient()
    assert "rolled back to 1" in client.get_model_version(name, "2").tags["rlhf.production.decision"]
    assert "restored by rollback" in client.get_model_version(name, "1").tags["rlhf.production.decision"]
    # Consumers of the alias now get version 1 again.
    assert client.get_model_version_by_alias(name, "production").version == "1"

    # Only one production version is left in the history: nothing further back to go to.
    with pytest.raises(UserError, match="no earlier production version"):
        registry.rollback(name)
    assert registry.alias_version(name, "production") == "1"


def test_rollback_without_history_is_a_user_error(server: MlflowServer) -> None:
    name = f"it-empty-{uuid.uuid4().hex[:8]}"
    mlflow.MlflowClient().create_registered_model(name)
    with pytest.raises(UserError, match="no earlier production version") as caught:
        registry.rollback(name)
    assert name in str(caught.value)
    assert registry.production_history(name) == []


def test_rollback_of_an_unknown_model_is_a_user_error(server: MlflowServer) -> None:
    with pytest.raises(UserError, match="it-missing"):
        registry.rollback(f"it-missing-{uuid.uuid4().hex[:8]}")


def test_alias_to_a_missing_version_or_unknown_stage_is_a_user_error(
    server: MlflowServer, registered: tuple[str, list[str], Any]
) -> None:
    name, _, _ = registered
    with pytest.raises(UserError, match="version 99"):
        registry.set_alias(name, "99", "staging", "no such version")
    with pytest.raises(UserError, match="unknown stage"):
        registry.set_alias(name, "1", "canary", "not a stage")


def _pickled_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "gpt2"}')
    # The bytes are never unpickled: the file's mere presence without safetensors must be refused.
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not-really-a-pickle")
    return directory


def test_pickled_only_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = _pickled_checkpoint(tmp_path / "pickled")
    with pytest.raises(UserError, match="no safetensors") as caught:
        resolve_checkpoint(str(checkpoint))
    assert "pytorch_model.bin" in str(caught.value)
    assert str(checkpoint) in str(caught.value)


def test_pickled_only_checkpoint_on_s3_is_refused(s3_server: S3Server, tmp_path: Path) -> None:
    uri = s3_server.uri(f"pickled-{uuid.uuid4().hex[:8]}")
    storage.upload_dir(_pickled_checkpoint(tmp_path / "pickled"), uri)
    with pytest.raises(UserError, match=r"pytorch_model\.bin") as caught:
        resolve_checkpoint(uri)
    assert uri in str(caught.value)


def test_concurrent_promotions_and_rollbacks_keep_alias_and_history_consistent(
    server: MlflowServer, registered: tuple[str, list[str], Any]
) -> None:
    """Two hands at once, ten rounds: two promotions of new versions, then a promotion against a rollback.
    After every round `production` is the last entry of a history that lost nothing and gained nothing."""
    rounds = 10
    name = _copy_versions(registered[0], 3 * rounds)

    def move(what: str) -> None:
        if what == "rollback":
            registry.rollback(name)
        else:
            registry.promote(name, what, "production")

    wrong = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for round_ in range(rounds):
            first, second, third = (str(3 * round_ + k) for k in (1, 2, 3))
            before = registry.production_history(name)
            list(pool.map(move, [first, second]))
            after = registry.production_history(name)
            added = sorted(after[len(before) :]) == sorted([first, second]) and after[: len(before)] == before
            if registry.alias_version(name, "production") != after[-1] or not added:
                wrong.append((round_, "promote", before, after))
            list(pool.map(move, [third, "rollback"]))
            final = registry.production_history(name)
            either_order = final in ([*after[:-1], third], after)
            if registry.alias_version(name, "production") != final[-1] or not either_order:
                wrong.append((round_, "rollback", after, final))
    assert wrong == []
    assert not [m for m in mlflow.MlflowClient().search_registered_models() if m.name.endswith(".rlhf-lock")]


def test_a_held_lock_is_waited_for_then_one_line_and_a_stale_one_is_taken_over(
    server: MlflowServer, registered: tuple[str, list[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _copy_versions(registered[0], 1)
    mlflow.MlflowClient().create_registered_model(f"{name}.rlhf-lock")  # a holder that is still at work
    monkeypatch.setattr(registry, "LOCK_WAIT_S", 0.5)
    held = rf"^model {name}: another promotion or rollback has held {name}\.rlhf-lock for 0.5 s; try again"
    with pytest.raises(UserError, match=held):
        registry.promote(name, "1", "production")
    assert registry.alias_version(name, "production") is None
    monkeypatch.setattr(registry, "LOCK_STALE_S", 0.0)  # the holder died: its lock is taken over
    registry.promote(name, "1", "production")
    assert registry.alias_version(name, "production") == "1" and registry.production_history(name) == ["1"]
    assert not mlflow.MlflowClient().search_registered_models(f"name = '{name}.rlhf-lock'")


def test_a_lock_released_while_the_server_checks_it_is_taken_on_the_next_try(
    server: MlflowServer, registered: tuple[str, list[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQL store answers a duplicate name by reading the existing model; when the holder releases the lock
    in between, the create fails with RESOURCE_DOES_NOT_EXIST. Replayed here with the server's own answer."""
    name = _copy_versions(registered[0], 1)
    lock = f"{name}.rlhf-lock"
    create = mlflow.MlflowClient.create_registered_model
    raced = []

    def create_after_a_release(self: mlflow.MlflowClient, model: str, *args: Any, **kwargs: Any) -> Any:
        if model == lock and not raced:
            raced.append(model)
            create(self, model)  # another holder's lock ...
            self.delete_registered_model(model)  # ... released before the server reads it back
            self.get_registered_model(model)  # the server's answer: RESOURCE_DOES_NOT_EXIST
        return create(self, model, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_registered_model", create_after_a_release)
    registry.promote(name, "1", "production")
    assert raced == [lock]
    assert registry.alias_version(name, "production") == "1" and registry.production_history(name) == ["1"]
    assert not mlflow.MlflowClient().search_registered_models(f"name = '{name}.rlhf-lock'")
