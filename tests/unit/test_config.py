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
        (_minimal(optimize={"compile": "fast"}), "optimize.compile"),
        (_minimal(optimize={"compile": "default"}), "set optimize.row_buckets"),
        (_minimal(optimize={"row_buckets": [4, 2]}), "strictly increasing"),
        (_minimal(optimize={"row_buckets": [1]}), "must hold one guided sample of family sd (2 rows)"),
        (_minimal(optimize={"warmup_sizes": [[512, 512]]}), "needs optimize.row_buckets"),
        (_minimal(optimize={"row_buckets": [2], "warmup_sizes": [[500, 512]]}), "multiples of 8"),
        (_minimal(optimize={"cuda_graphs": True}), "unknown optimize field"),
        (
            _minimal() | {"openai": {"model_aliases": {"gpt-image-1": "sd15"}}},
            "not a configured model; configured: m",
        ),
        (_minimal() | {"openai": {"model_aliases": {"m": "m"}}}, "already a model id"),
        (
            {"models": [{"spec": {"id": "m", "family": "sd", "source": "o/m", "default_steps": 20}}]},
            "was removed",
        ),
        (_minimal() | {"control_plane": {"kind": "etcd"}}, "control_plane.kind"),
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
    monkeypatch.setenv("IMG2IMG_API_KEYS", '{"sk-acme-7f3e9a1c2b4d": "acme"}')
    assert Secrets().keys() == {"sk-acme-7f3e9a1c2b4d": "acme"}


def test_production_optimize_blocks_bound_the_compiled_shapes():
    """Every compiled production model pads to buckets that hold its engine's largest call."""
    args = AppArgs.model_validate(_args(Path("cluster/serve_config.yaml")))
    compiled = [m for m in args.models if m.optimize_config.compile != "off"]
    assert compiled, "production compiles at least one UNet"
    for model in compiled:
        optimize, engine = model.optimize_config, model.engine_config
        assert optimize.warmup_shapes >= len(optimize.row_buckets)
        if engine.max_batch_row_area:  # the warm-up size's largest call fits the largest bucket
            height, width = optimize.warmup_sizes[0]
            rows_at_size = engine.max_batch_row_area // ((height // 8) * (width // 8))
            assert optimize.max_rows >= min(rows_at_size, 2 * engine.max_batch_samples)


def test_a_redis_control_plane_without_its_address_fails_at_start_up_with_a_teaching_error(monkeypatch):
    from serve.config import AppArgs, Secrets
    from serve.wiring import redis_url

    monkeypatch.delenv("IMG2IMG_REDIS_URL", raising=False)
    args = AppArgs.model_validate(_minimal() | {"control_plane": {"kind": "redis"}})
    with pytest.raises(ValueError, match="set IMG2IMG_REDIS_URL"):
        redis_url(args, Secrets())
    monkeypatch.setenv("IMG2IMG_REDIS_URL", "redis://:pw@127.0.0.1:6379/0")
    assert redis_url(args, Secrets()) == "redis://:pw@127.0.0.1:6379/0"
    assert redis_url(AppArgs.model_validate(_minimal()), Secrets()) is None  # local: no Redis at all
