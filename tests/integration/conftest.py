"""Fixtures for integration tests: real servers on loopback, one per test session."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster import multinode
from serve.tenancy.keys import hash_key
from tests.support.redis_server import RedisServer
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A running ``redis-server`` (Debian's package) with a password. Missing binary = failure."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
    server.start()
    yield server
    server.stop()


WEBHOOK_SECRET = "integration-webhook-secret"
LIMITED_KEY = "sk-limited-integration-key"


@dataclass(frozen=True)
class Stack:
    """The running service: its URL, an API key, Ray's metrics exporter and the S3 server behind it."""

    base_url: str
    api_key: str
    metrics_url: str
    s3: SeaweedS3Server
    bucket: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def _stack_args(model_dir: Path, bucket: str) -> dict:
    return {
        "models": [
            {
                "spec": {"id": "tiny-sd", "family": "sd", "source": str(model_dir), "smoke": True},
                "engine": {"max_batch_samples": 8},
                "scaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
                "num_cpus": 0.5,
                "torch_threads": 1,
                "max_ongoing_requests": 32,
            }
        ],
        # Two ingress replicas: tenant limits must hold across them (the governor is shared).
        "ingress": {"scaling": {"min_replicas": 2, "max_replicas": 2}, "num_cpus": 0.25},
        "tenants": [
            {
                "name": "limited",
                "key_hashes": [hash_key(LIMITED_KEY)],
                "rate_limit_images_per_minute": 4,
                "allowed_models": ["tiny-sd"],
                "max_images_per_request": 2,
            }
        ],
        "storage": {"kind": "s3", "bucket": bucket, "url_expiry_s": 600},
        "fetch": {"allow_networks": ["127.0.0.1/32"]},
        "webhooks": {"max_attempts": 4, "first_delay_s": 0.2, "timeout_s": 5},
        "request_timeout_s": 120,
        # OpenAI code that names OpenAI's models runs unchanged (test_openai_client.py).
        "openai": {"model_aliases": {"gpt-image-1": "tiny-sd", "dall-e-2": "tiny-sd"}},
    }


@pytest.fixture(scope="session")
def stack(s3_server, redis_server, tiny_model_dirs) -> Stack:
    """One Ray cluster (in-process, loopback) with the app deployed on the tiny model and real S3.

    Secrets reach Ray's worker processes through the environment, so they are set before ``ray.init``.
    """
    import ray
    from ray import serve

    from inference.models import Family
    from serve.app import build_app
    from tests.support.prometheus import free_port

    api_key = "integration-key-" + "x" * 8
    os.environ.update(
        {
            "IMG2IMG_API_KEYS": json.dumps({api_key: "tenant-a", "integration-key-b-12345": "tenant-b"}),
            "IMG2IMG_S3_ENDPOINT": s3_server.endpoint,
            "IMG2IMG_S3_ACCESS_KEY": s3_server.access_key,
            "IMG2IMG_S3_SECRET_KEY": s3_server.secret_key,
            "IMG2IMG_S3_SECURE": "false",
            "IMG2IMG_WEBHOOK_SECRET": WEBHOOK_SECRET,
            # Only side applications with control_plane.kind redis use it (the main app is local).
            "IMG2IMG_REDIS_URL": redis_server.url,
            "RAY_metrics_report_interval_ms": "1000",
        }
    )
    metrics_port, http_port = free_port(), free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    bucket = "integration-outputs"
    serve.run(build_app(_stack_args(tiny_model_dirs[Family.SD], bucket)), name="img2img", route_prefix="/")
    yield Stack(f"http://127.0.0.1:{http_port}", api_key, f"127.0.0.1:{metrics_port}", s3_server, bucket)
    serve.shutdown()
    ray.shutdown()


def wait_for(condition, timeout_s: float, interval_s: float = 0.5, message: str = "condition"):
    """Poll ``condition`` until it returns something truthy (returned), or fail after ``timeout_s``."""
    return multinode.wait_for(condition, timeout_s, message, interval_s)


def wait_until_ready(stack: Stack, timeout_s: float = 120) -> None:
    import httpx

    ready = lambda: httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 200  # noqa: E731
    wait_for(ready, timeout_s, 1, "readiness")


@pytest.fixture(scope="module")
def client(stack):
    """An authenticated HTTP client on the ready stack (per module: a module may kill replicas)."""
    import httpx

    wait_until_ready(stack)
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def prometheus(stack):
    from tests.support.prometheus import PrometheusServer

    server = PrometheusServer([stack.metrics_url]).start()
    yield server
    server.stop()


@contextlib.contextmanager
def side_app(stack: Stack, args: dict, name: str, route_prefix: str, ready_timeout_s: float | None = 180):
    """Deploy a second application on the session's cluster (own args, bucket and prefix), wait until
    its ``/readyz`` answers 200 (unless ``ready_timeout_s`` is None), yield its base URL, delete it."""
    import httpx
    from ray import serve

    from serve.app import build_app

    serve._run(build_app(args), name=name, route_prefix=route_prefix, _blocking=False)
    base = f"{stack.base_url}{route_prefix}"
    try:
        if ready_timeout_s is not None:

            def ready() -> bool:
                try:  # a replica still loading models can make the probe itself slow: retry it
                    return httpx.get(f"{base}/readyz", timeout=10).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, ready_timeout_s, 0.5, f"the {name} application ready")
        yield base
    finally:
        serve.delete(name)


def side_client(stack: Stack, base: str):
    """An authenticated client on a side application."""
    import httpx

    return httpx.Client(base_url=base, headers=stack.headers, timeout=120)
