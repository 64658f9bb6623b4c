"""Fixtures for integration tests: real servers on loopback, one per test session."""

from __future__ import annotations

import pytest

from tests.support.s3server import SETUP_HINT, SeaweedS3Server, find_weed


@pytest.fixture(scope="session")
def s3_server():
    """A running SeaweedFS S3 server (``weed mini``). Missing binary = failure, never a skip: these
    tests are the only proof that storage works against real S3."""
    try:
        find_weed()
    except FileNotFoundError:
        pytest.fail(f"SeaweedFS `weed` binary not found; {SETUP_HINT}", pytrace=False)
    with SeaweedS3Server() as server:
        yield server
