"""S3 goes down mid-load: clear 503s, readiness says so, recovery when it returns, no accepted job lost."""

from __future__ import annotations

import httpx

from tests.integration.test_jobs_stack import URL, _body, _final
from tests.integration.test_serve_stack import _wait_for


def test_storage_outage_is_503_not_ready_and_accepted_jobs_complete_after_recovery(client, stack):
    accepted = client.post(
        URL,
        json=_body(steps=30, strength=1.0, prompt="outlives the outage"),
        headers={"Prefer": "respond-async"},
    )
    assert accepted.status_code == 202
    stack.s3.stop()  # like a crash: SIGKILL
    try:
        during = client.post(URL, json=_body(steps=4))
        assert during.status_code == 503, during.text
        assert during.json()["error"]["code"] == "storage_unavailable" and "retry-after" in during.headers
        ready = httpx.get(f"{stack.base_url}/readyz", timeout=10)
        assert ready.status_code == 503 and "storage" in ready.json()["problems"]
    finally:
        stack.s3.start()
    _wait_for(lambda: httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 200, 60, 1, "recovery")
    assert client.post(URL, json=_body(steps=4)).status_code == 200
    final = _final(client, accepted.json()["id"], 180)
    assert final["status"] == "completed" and len(final["images"]) == 1
