"""Registry operations shared by the pipeline step and the `rlhf promote` / `rlhf rollback` commands.

Stages are MLflow aliases (`staging`, `production`); registry stages are deprecated since MLflow 2.9, so the
legacy stage is set too only where the server still accepts it. Every production move is appended to the
registered model's `rlhf.production_history` tag, which is what `rollback` walks back.

MLflow has no compare-and-swap, so a production move (alias + history) happens under a lock: a registered
model named `<model>.rlhf-lock`, whose creation is atomic on any registry with a database (the name is its
key). A holder that died leaves it behind; it is taken over once it is `LOCK_STALE_S` old.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime

from rlhf_components.core.errors import UserError

log = logging.getLogger(__name__)

ALIASES = ("staging", "production")
HISTORY_TAG = "rlhf.production_history"
LOCK_SUFFIX = ".rlhf-lock"
LOCK_WAIT_S = 60.0
LOCK_STALE_S = 300.0  # a production move takes seconds; this also covers clock skew with the server


def _mlflow_error(action: str, error: Exception) -> UserError:
    return UserError(f"{action}: {getattr(error, 'message', error)}")


def alias_version(name: str, alias: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def production_history(name: str) -> list[str]:
    import mlflow

    tags = mlflow.MlflowClient().get_registered_model(name).tags
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def set_alias(name: str, version: str, alias: str, reason: str) -> None:
    """Point `alias` at `version`, record why on the version, and mirror it to the legacy stage."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if alias not in ALIASES:
        raise UserError(f"unknown stage {alias!r}; use one of: {', '.join(ALIASES)}")
    client = mlflow.MlflowClient()
    try:
        client.get_model_version(name, version)
        with _production_lock(name) if alias == "production" else nullcontext():
            client.set_registered_model_alias(name, alias, version)
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            client.set_model_version_tag(name, version, f"rlhf.{alias}.decision", f"{stamp} {reason}")
            if alias == "production":
                history = production_history(name)
                if not history or history[-1] != str(version):
                    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, str(version)]))
            _mirror_legacy_stage(name, str(version), alias)
    except MlflowException as error:
        raise _mlflow_error(f"model {name} version {version}", error) from None


@contextmanager
def _production_lock(name: str) -> Iterator[None]:
    """Hold `<name>.rlhf-lock` (see the module's text) while the body runs."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            client.create_registered_model(
                lock,
                description=f"held while rlhf moves the production alias of {name}; delete it only if "
                "no rlhf promote, rollback or pipeline is running",
            )
            break
        except MlflowException as error:
            # The SQL store answers a duplicate name by reading the holder's lock; a holder that released it
            # in between turns that into RESOURCE_DOES_NOT_EXIST. Both mean "taken just now": try again.
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        age = _age_seconds(lock)
        if age is not None and age > LOCK_STALE_S:
            log.warning(
                "model %s: taking over %s, left %.0f s ago by a process that did not finish", name, lock, age
            )
            with suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise UserError(
                f"model {name}: another promotion or rollback has held {lock} for {LOCK_WAIT_S:g} s; try "
                "again (delete that registered model if no rlhf command or pipeline is running)"
            )
        time.sleep(0.05 + random.random() * 0.1)
    try:
        yield
    finally:
        with suppress(MlflowException):
            client.delete_registered_model(lock)


def _age_seconds(lock: str) -> float | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        created = mlflow.MlflowClient().get_registered_model(lock).creation_timestamp
    except MlflowException:  # released meanwhile
        return None
    return time.time() - created / 1000 if created else None


def _mirror_legacy_stage(name: str, version: str, alias: str) -> None:
    """Keep the deprecated registry stage in step with the alias, where the server still has stages."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.MlflowClient().transition_model_version_stage(
                name, version, alias.capitalize(), archive_existing_versions=alias == "production"
            )
    except MlflowException:
        log.info("the server does not support legacy registry stages; alias %s set", alias)


def promote(name: str, version: str, alias: str, reason: str = "promoted by hand") -> None:
    set_alias(name, str(version), alias, reason)


def rollback(name: str) -> tuple[str, str]:
    """Move `production` back to the version that held it before; returns (from, to)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with _production_lock(name):
            history = production_history(name)
            current = alias_version(name, "production")
            if current is None or len(history) < 2:
                raise UserError(f"model {name}: no earlier production version to roll back to")
            previous = history[-2]
            client = mlflow.MlflowClient()
            client.set_registered_model_alias(name, "production", previous)
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            client.set_model_version_tag(
                name, current, "rlhf.production.decision", f"{stamp} rolled back to {previous}"
            )
            client.set_model_version_tag(
                name, previous, "rlhf.production.decision", f"{stamp} restored by rollback"
            )
            _mirror_legacy_stage(name, previous, "production")
    except MlflowException as error:
        raise _mlflow_error(f"model {name}", error) from None
    return current, previous
