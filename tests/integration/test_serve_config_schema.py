"""The shipped Serve configs pass Ray Serve's own schema (old field names would be silently ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema


@pytest.mark.parametrize("path", sorted(Path("cluster").glob("serve_config*.yaml")), ids=lambda p: p.name)
def test_serve_config_matches_ray_serve_schema(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.applications[0].import_path == "serve.app:build_app"
