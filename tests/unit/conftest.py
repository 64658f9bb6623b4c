"""Fixtures for the HTTP-layer tests (tests/unit/test_api_*.py); see api_fakes for the fakes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve.generation import service as generation
from tests.unit.api_fakes import FakeBackend, FakeFetch, build_app


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(tmp_path, backend):
    return build_app(tmp_path, backend)


@pytest.fixture
def client(app):
    """In-process client; server exceptions become responses, as a real server would send them."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def fake_fetch(monkeypatch) -> FakeFetch:
    """URL sources without network: every http(s) image URL yields a 96x64 JPEG."""
    fake = FakeFetch()
    monkeypatch.setattr(generation, "fetch_image", fake)
    return fake
