"""Serve config validation: the shipped YAMLs are valid; mistakes fail at start-up with teaching errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.config import AppArgs, Secrets

CONFIGS = sorted(Path("cluster").glob("serve_config*.yaml"))


def _args(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["applications"][0]["args"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_serve_configs_validate(path):
    args = AppArgs.model_validate(_args(path))
    for model in args.models:
        # max_ongoing_requests 2-4x the engine's cap keeps a replica's batch full.
        assert 2 <= model.ongoing_limit / model.engine_config.max_batch_samples <= 4
        assert model.scaling.target_ongoing_requests <= model.ongoing_limit


def test_canonical_config_is_the_gpu_production_one():
    args = AppArgs.model_validate(_args(Path("cluster/serve_config.yaml")))
    assert all(model.num_gpus == 1 for model in args.models)
    assert args.storage.kind == "s3"


def _minimal(**model_changes) -> dict:
    model = {"spec": {"id": "m", "family": "sd", "source": "org/m"}} | model_changes
    return {"models": [model]}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (_minimal(engine={"max_batch_size": 8}), "unknown engine field"),
        (_minimal(engine={"admission": "random"}), "admission"),
        (_minimal(scaling={"min_replicas": 3, "max_replicas": 1}), "must not exceed"),
        (_minimal(scaling={"target_num_ongoing_requests_per_replica": 4}), "Extra inputs are not permitted"),
        ({"models": [{"spec": {"id": "m", "family": "dalle", "source": "x"}}]}, "'family'"),
        ({"models": []}, "at least 1"),
        ({"models": [_minimal()["models"][0]] * 2}, "repeated"),
        (_minimal() | {"storage": {"kind": "gcs"}}, "storage.kind"),
        (_minimal(num_gpus=-1), "num_gpus"),
    ],
)
def test_bad_config_fails_with_a_message_naming_the_problem(args, fragment):
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate(args)
    assert fragment in str(caught.value)


def test_secrets_refuse_placeholders_and_require_a_key(monkeypatch):
    monkeypatch.setenv("IMG2IMG_DEV_API_KEY", "changeme")
    with pytest.raises(ValidationError, match="placeholder"):
        Secrets()
    monkeypatch.delenv("IMG2IMG_DEV_API_KEY")
    monkeypatch.delenv("IMG2IMG_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no API keys"):
        Secrets().keys()
    monkeypatch.setenv("IMG2IMG_API_KEYS", '{"k-1234567890": "acme"}')
    assert Secrets().keys() == {"k-1234567890": "acme"}
