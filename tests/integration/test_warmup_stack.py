"""A compiled model replica warms every configured UNet shape before it takes traffic.

A third application on the session's Ray cluster: the tiny SD model with ``compile: default``,
two row buckets and one warm-up size (two shapes; the tiny UNet's first compile takes tens of
seconds on this CPU). While its replica compiles in its constructor, ``/readyz`` answers 503 and
names the progress ("warming up: k of 2 shapes"), read from Ray's key-value store; then 200, and a
request is served by the compiled UNet.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.integration.conftest import _stack_args, side_app, wait_for
from tests.integration.test_jobs_stack import URL, _body

APP_NAME, ROUTE_PREFIX = "warm-up", "/warm"
OPTIMIZE = {"compile": "default", "row_buckets": [2, 4], "warmup_sizes": [[64, 64]]}


@pytest.fixture(scope="module")
def warming(stack, tiny_model_dirs):
    from inference.models import Family

    args = _stack_args(tiny_model_dirs[Family.SD], "integration-warm-up")
    args["models"][0].update({"optimize": OPTIMIZE, "num_cpus": 0.25, "engine": {"max_batch_samples": 2}})
    args["tenants"] = []
    args["ingress"] = {"scaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.1}
    with side_app(stack, args, APP_NAME, ROUTE_PREFIX, ready_timeout_s=None) as base:
        yield base  # the test watches readiness itself


def test_readiness_reports_warm_up_progress_then_the_compiled_model_serves(warming, stack):
    seen: list[str] = []

    def ready() -> bool:
        try:
            response = httpx.get(f"{warming}/readyz", timeout=10)
        except httpx.HTTPError:
            return False  # the application's ingress is not up yet
        if response.status_code == 200:
            return True
        if response.status_code == 503:
            seen.extend(response.json()["problems"].values())
        return False

    wait_for(ready, 420, 0.25, "the compiling application ready")
    progress = [text for text in seen if text.startswith("warming up:")]
    print(f"readiness while starting: {sorted(set(seen))}")
    assert progress, f"no warm-up progress reported while starting; saw {sorted(set(seen))}"
    assert all(re.fullmatch(r"warming up: [0-2] of 2 shapes", text) for text in progress), progress
    with httpx.Client(base_url=warming, headers=stack.headers, timeout=120) as http:
        response = http.post(URL, json=_body(steps=6, strength=0.8, seed=5))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
