"""Faults on the real stack while it works: a model replica killed under load, a dead webhook receiver.

Bounded: every wait has a deadline, the load is a fixed number of requests. What must hold:
in-flight synchronous requests either succeed (the backend re-sends a request whose replica died,
once, within the same deadline) or get a 503 with Retry-After; none waits past the request timeout;
accepted async jobs complete; Serve replaces the replica; a webhook receiver that stays down costs
the job nothing but a delivery recorded as failed, attempt by attempt.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.conftest import wait_for as _wait_for
from tests.integration.faults import kill_replicas, live_replicas
from tests.integration.test_jobs_stack import URL, _body, _final, _submit
from tests.integration.test_serve_stack import _download

REQUEST_TIMEOUT_S = 120  # the stack's request_timeout_s (tests/integration/conftest.py)


def _timed_post(stack, body: dict) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=REQUEST_TIMEOUT_S + 30) as http:
        response = http.post(URL, json=body)
    return response.status_code, response.json(), dict(response.headers), time.monotonic() - started


def test_killing_the_model_replica_under_load_loses_nothing(client, stack):
    jobs = [_submit(client, steps=40, strength=1.0, num_images=2, prompt=f"job {i}") for i in range(2)]
    bodies = [_body(steps=30, strength=1.0, seed=i, prompt=f"sync {i}") for i in range(6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(_timed_post, stack, body) for body in bodies]
        running = lambda: client.get(f"{URL}/{jobs[0]['id']}").json()["progress"]["steps_done"] > 0  # noqa: E731
        _wait_for(running, 60, 0.2, "the model working")
        killed = kill_replicas("model-tiny-sd")
        results = [future.result(timeout=REQUEST_TIMEOUT_S + 60) for future in futures]

    outcomes = []
    for status, body, headers, elapsed in results:
        assert elapsed < REQUEST_TIMEOUT_S + 10, f"a request waited {elapsed:.0f}s"
        if status == 200:
            assert body["status"] == "completed" and len(body["images"]) == 1
            assert _download(body["images"][0]["url"]).size == (64, 64)
        else:  # refused cleanly: a 503 the client can retry, never a 500
            assert status == 503, body
            assert body["error"]["code"] in ("model_unavailable", "overloaded"), body
            assert int(headers["retry-after"]) > 0
        outcomes.append(status)
    print(f"replica kill under load: statuses {outcomes}, slowest {max(r[3] for r in results):.1f}s")
    assert outcomes.count(200) >= 1, outcomes  # the re-sent requests land on the replacement

    for job in jobs:  # accepted work is never silently lost
        final = _final(client, job["id"], 240)
        assert final["status"] == "completed", final.get("error")
        assert len(final["images"]) == 2

    _wait_for(lambda: set(live_replicas("model-tiny-sd")) - set(killed), 120, 1, "a replacement replica")
    assert client.get("/readyz").status_code == 200
    again = client.post(URL, json=_body(steps=4))
    assert again.status_code == 200, again.text


def _closed_loopback_port() -> int:
    """A port nothing listens on: bind, read the number, close (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_webhook_receiver_that_stays_down_gets_every_attempt_and_a_failed_delivery(client):
    hook = f"http://127.0.0.1:{_closed_loopback_port()}/hook"
    job = client.post(URL, json=_body(steps=4, webhook_url=hook)).json()
    final = _final(client, job["id"])
    assert final["status"] == "completed" and final["images"], final  # the result is kept and readable

    def delivery_settled():
        webhook = client.get(f"{URL}/{job['id']}").json()["webhook"]
        return webhook["status"] != "pending" and webhook

    webhook = _wait_for(delivery_settled, 60, 0.5, "the webhook delivery to settle")
    assert webhook["status"] == "failed" and webhook["delivered"] is False
    attempts = webhook["attempts"]
    assert len(attempts) == 4  # the stack's webhooks.max_attempts
    assert all(a["status_code"] is None and a["error"] for a in attempts), attempts
