"""Shared fixtures. Everything runs offline: the tiny random-weight models are built on first use."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Family -> folder of its tiny random-weight smoke model (output is noise), built once per session."""
    from inference.tiny import ensure_tiny_models  # torch is imported only by tests that need it

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_registry(tiny_model_dirs):
    """A ModelRegistry of the three tiny models; tiny-sd is the default."""
    from inference.models import ModelRegistry
    from inference.tiny import tiny_model_specs

    root = next(iter(tiny_model_dirs.values())).parent
    return ModelRegistry.from_config(tiny_model_specs(root))


def pytest_collection_modifyitems(config, items):
    """Mark tests by folder, so `-m unit` / `-m integration` select them without per-file markers."""
    for item in items:
        folder = item.path.parent.name
        if folder in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, folder))
