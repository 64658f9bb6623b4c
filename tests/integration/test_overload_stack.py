"""Overload on the real stack: a burst far beyond capacity is refused fast and cleanly, then served again.

A second application on the session's Ray cluster, deliberately tight (one model replica taking one
request at a time, a queue of one per caller, one ingress replica), so a small burst overflows it
cheaply. It has its own bucket: its job coordinator must not resume the main application's jobs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import _stack_args, side_app, side_client
from tests.integration.test_jobs_stack import URL, _body

BURST = 10


@pytest.fixture(scope="module")
def tight(stack, tiny_model_dirs):
    from inference.models import Family

    args = _stack_args(tiny_model_dirs[Family.SD], "integration-overload")
    model = args["models"][0]
    model.update({"max_ongoing_requests": 1, "max_queued_requests": 1, "engine": {"max_batch_samples": 1}})
    args["ingress"] = {"scaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.1}
    with side_app(stack, args, "tight", "/tight") as base, side_client(stack, base) as http:
        yield http


def _timed(http: httpx.Client, body: dict) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    response = http.post(URL, json=body)
    return response.status_code, response.json(), dict(response.headers), time.monotonic() - started


def test_a_burst_beyond_capacity_gets_fast_503s_and_the_rest_is_served(tight):
    bodies = [_body(steps=20, strength=1.0, seed=i) for i in range(BURST)]
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(lambda body: _timed(tight, body), bodies))
    statuses = sorted(status for status, *_ in results)
    print(f"overload burst of {BURST}: statuses {statuses}")
    assert set(statuses) <= {200, 503}, results
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, body, headers, elapsed in results:
        if status == 503:  # refused at the door: no queueing, a hint when to come back
            assert body["error"]["code"] == "overloaded", body
            assert int(headers["retry-after"]) > 0
            assert elapsed < 10, f"a refusal took {elapsed:.1f}s"
        else:
            assert body["status"] == "completed" and body["images"]
    again = tight.post(URL, json=_body(steps=4))  # the burst is over: served again
    assert again.status_code == 200, again.text
