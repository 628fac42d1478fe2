"""Fixtures every test layer shares: tiny demo assets and a run context on a throw-away MLflow store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_components.core.tracking import RunContext, TrackingConfig, start_pipeline_run
from rlhf_components.demo import DemoAssets, DemoAssetsSpec, build_demo_assets

TINY_SPEC = DemoAssetsSpec(n_corpus=300, n_prompts=60, sft_steps=30, n_embd=32, n_head=2, n_layer=1)


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No progress bars in test logs, and no model cache shared with the user's home directory."""
    saved = {key: os.environ.get(key) for key in ("RLHF_NO_PROGRESS", "RLHF_CACHE_DIR")}
    os.environ["RLHF_NO_PROGRESS"] = "1"
    os.environ["RLHF_CACHE_DIR"] = str(tmp_path_factory.mktemp("rlhf-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    """A one-layer, 32-wide GPT-2 with a short SFT pass on the demo grammar (a few seconds to build)."""
    return build_demo_assets(tmp_path_factory.mktemp("tiny-assets"), TINY_SPEC)


@pytest.fixture
def sqlite_tracking(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="tests")


@pytest.fixture
def run_context(tmp_path: Path, sqlite_tracking: TrackingConfig) -> RunContext:
    """A pipeline parent run on a fresh sqlite MLflow store, with outputs under tmp_path."""
    uri, run_id = start_pipeline_run(sqlite_tracking, "test-pipeline", {"test": True}, {})
    return RunContext(
        tracking_uri=uri,
        experiment=sqlite_tracking.experiment,
        parent_run_id=run_id,
        output_root=str(tmp_path / "outputs"),
    )
