"""Asynchronous jobs on the real stack: Ray Serve, the job coordinator, SeaweedFS and a webhook receiver."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from PIL import Image

from serve.jobs.webhooks import derive_webhook_secret
from tests.integration.conftest import WEBHOOK_SECRET
from tests.integration.faults import kill_replicas
from tests.integration.test_serve_stack import _data_url, _metric_sum, _png, _wait_for
from tests.support.job_events import job_events, preview_pictures
from tests.unit.api_fakes import receiver_verifies

URL = "/v1/image-to-image"


def _body(**overrides):
    return {"image": _data_url(_png()), "prompt": "a harbour at night", "steps": 10, **overrides}


def _submit(client, **overrides) -> dict:
    response = client.post(URL, json=_body(**overrides), headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"{URL}/{response.json()['id']}"
    return response.json()


def _final(client, job_id: str, timeout_s: float = 120) -> dict:
    def done():
        job = client.get(f"{URL}/{job_id}").json()
        return job["status"] in ("completed", "failed", "canceled") and job

    return _wait_for(done, timeout_s, 0.5, f"job {job_id} finished")


def test_async_job_completes_and_its_events_stream(client):
    job = _submit(client, num_images=2)
    with client.stream("GET", f"{URL}/{job['id']}/events") as response:
        events = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "completed"
    final = client.get(f"{URL}/{job['id']}").json()
    progress = final["progress"]
    assert len(final["images"]) == 2 and progress["steps_done"] == progress["steps_total"] > 0
    assert httpx.get(final["images"][0]["url"], timeout=30).status_code == 200


def test_a_running_jobs_events_carry_previews_from_the_engine(client, stack):
    """``previews.job_every_steps`` (5 by default): the engine's previews of a running job reach its
    event stream through the one coordinator; they differ as the latents move."""
    # Long enough (a few seconds on CPU) for the stream's polls to find it processing.
    job = _submit(client, image=_data_url(_png((512, 512))), steps=50, strength=1.0, num_images=2)
    events = job_events(client, job["id"])
    assert events[-1][0] == "completed"
    previews = [data for name, data in events if name == "preview"]
    assert previews, [name for name, _ in events]
    assert all(p["id"] == job["id"] and p["step"] % 5 == 0 and p["step"] < p["steps"] for p in previews)
    pictures = preview_pictures(events)
    assert all(Image.open(io.BytesIO(p)).format == "JPEG" for p in pictures)
    assert len(pictures) < 2 or len(set(pictures)) > 1
    # the replica meters them (a metric missing its model tag would raise in the step loop instead)
    _wait_for(lambda: _metric_sum(stack, "ray_img2img_previews_total") > 0, 30, 1, "preview metrics")


def test_cancel_a_running_job_leaves_the_others_alone(client):
    slow = _submit(client, steps=50, strength=1.0, num_images=4, prompt="slow")
    other = _submit(client, steps=10, prompt="other")
    started = lambda: client.get(f"{URL}/{slow['id']}").json()["progress"]["steps_done"] > 0  # noqa: E731
    _wait_for(started, 60, 0.2, "progress")
    canceled = client.delete(f"{URL}/{slow['id']}")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert _final(client, other["id"])["status"] == "completed"
    assert client.get(f"{URL}/{slow['id']}").json()["status"] == "canceled"


def test_idempotency_key_over_http(client):
    headers = {"Prefer": "respond-async", "Idempotency-Key": "integration-order-1"}
    first = client.post(URL, json=_body(seed=11), headers=headers)
    again = client.post(URL, json=_body(seed=11), headers=headers)
    assert first.status_code in (200, 202) and again.json()["id"] == first.json()["id"]
    conflict = client.post(URL, json=_body(seed=12), headers=headers)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"


def test_webhook_receiver_failing_twice_gets_one_signed_delivery_and_three_attempts_recorded(client):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(503 if len(received) <= 2 else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        response = client.post(
            URL, json=_body(webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook")
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        _wait_for(lambda: len(received) >= 3, 90, 0.5, "three webhook attempts")
        job = lambda: client.get(f"{URL}/{job_id}").json()  # noqa: E731
        delivered = _wait_for(lambda: (j := job())["webhook"]["delivered"] and j, 30, 0.5, "delivery")
    finally:
        server.shutdown()
    assert len(received) == 3
    headers, raw = received[-1]
    secret = derive_webhook_secret(WEBHOOK_SECRET.encode(), "tenant-a")  # per tenant (issue 13)
    assert receiver_verifies(secret, raw, headers, tenant="tenant-a")  # with the standardwebhooks package
    assert not receiver_verifies(WEBHOOK_SECRET.encode(), raw, headers)
    assert json.loads(raw)["id"] == job_id and json.loads(raw)["status"] == "completed"
    assert [a["status_code"] for a in delivered["webhook"]["attempts"]] == [503, 503, 204]


def test_a_job_survives_its_ingress_replica_being_killed(client, stack):
    job = _submit(client, steps=40, strength=1.0, num_images=2, prompt="survivor")
    kill_replicas("Ingress")

    def ingress_back():
        try:
            return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(ingress_back, 120, 1, "a replacement ingress replica")
    assert _final(client, job["id"], 180)["status"] == "completed"


def test_a_job_whose_model_replica_dies_is_retried_on_the_replacement(client):
    job = _submit(client, steps=50, strength=1.0, num_images=4, prompt="phoenix")
    started = lambda: client.get(f"{URL}/{job['id']}").json()["progress"]["steps_done"] > 0  # noqa: E731
    _wait_for(started, 60, 0.2, "the job running")
    kill_replicas("model-tiny-sd")
    final = _final(client, job["id"], 240)
    assert final["status"] == "completed", final.get("error")
    assert len(final["images"]) == 4
