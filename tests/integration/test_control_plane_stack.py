"""The Redis control plane on the real stack: four ingress replicas and two job coordinators on Ray
Serve, a real ``redis-server`` and real S3. A burst admits exactly the tenant's limit across the four
replicas; a coordinator SIGKILLed mid-job has its job finished by the other, once; Redis restarted
under load answers 503 with Retry-After meanwhile, then recovers, and no accepted job is lost."""

from __future__ import annotations

import concurrent.futures
import copy
import io
import os
import signal
import time

import httpx
import pytest
import redis
from PIL import Image

from inference.models import Family
from serve.tenancy.keys import hash_key
from tests.integration.conftest import _stack_args, side_app, side_client, wait_for
from tests.support.job_events import job_events, preview_pictures
from tests.unit.api_fakes import data_url

BURST_KEY = "sk-burst-control-plane-0001"
LIMIT = 6  # images per minute for the burst tenant


@pytest.fixture(scope="module")
def plane(stack, tiny_model_dirs):
    args = copy.deepcopy(_stack_args(tiny_model_dirs[Family.SD], stack.bucket))
    args["ingress"] = {"scaling": {"min_replicas": 4, "max_replicas": 4}, "num_cpus": 0.1}
    args["control_plane"] = {
        "kind": "redis",
        "lease_s": 2,
        "slot_ttl_s": 120,
        "coordinators": {"min_replicas": 2, "max_replicas": 2},
    }
    args["tenants"].append(
        {"name": "burst", "key_hashes": [hash_key(BURST_KEY)], "rate_limit_images_per_minute": LIMIT}
    )
    with side_app(stack, args, "plane", "/plane", ready_timeout_s=300) as base:
        yield base


def body(**overrides) -> dict:
    return {"image": data_url(64, 64), "prompt": "a lighthouse", "steps": 2, "strength": 0.5, **overrides}


def test_a_burst_across_four_ingress_replicas_admits_exactly_the_limit(stack, redis_server, plane):
    headers = {"Authorization": f"Bearer {BURST_KEY}"}

    def send(_):
        return httpx.post(f"{plane}/v1/image-to-image", json=body(), headers=headers, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(send, range(24)))
    assert statuses.count(200) == LIMIT, sorted(statuses)  # never LIMIT + 1, whichever replica took it
    assert statuses.count(429) == 24 - LIMIT, statuses


def test_previews_of_a_job_reach_its_event_stream_through_redis_and_are_kept_nowhere(
    stack, redis_server, plane
):
    """Two coordinators, four ingress replicas: whichever runs the job publishes its previews on the
    job's Redis channel and whichever streams its events subscribes; Redis keeps none of them."""
    with side_client(stack, plane) as client:
        # Long enough (a few seconds on CPU) for the stream's polls to find it processing.
        job = body(image=data_url(512, 512), steps=50, strength=1.0, num_images=2, seed=5)
        accepted = client.post("/v1/image-to-image", json=job, headers={"Prefer": "respond-async"})
        assert accepted.status_code == 202, accepted.text
        events = job_events(client, accepted.json()["id"])
    assert events[-1][0] == "completed"
    pictures = preview_pictures(events)
    assert pictures, [name for name, _ in events]
    assert all(Image.open(io.BytesIO(p)).size == (64, 64) for p in pictures)  # 512² → its 64² latent grid
    assert redis.Redis.from_url(redis_server.url).keys("img2img:previews*") == []


def _holder_pid(url: str, job_id: str) -> int | None:
    holder = redis.Redis.from_url(url).get(f"img2img:lease:{job_id}")
    return int(holder.decode().split(":")[1]) if holder else None


def test_a_coordinator_killed_mid_job_has_the_job_finished_once_by_another(stack, redis_server, plane):
    with side_client(stack, plane) as client:
        long_job = body(image=data_url(256, 256), steps=50, strength=1.0, num_images=2, seed=11)
        accepted = client.post("/v1/image-to-image", json=long_job, headers={"Prefer": "respond-async"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        pid = wait_for(lambda: _holder_pid(redis_server.url, job_id), 30, 0.05, "the job's lease taken")
        assert client.get(f"/v1/image-to-image/{job_id}").json()["status"] in ("queued", "processing")
        os.kill(pid, signal.SIGKILL)  # the coordinator holding the job dies mid-job
        killed_at = time.monotonic()

        def finished():
            job = client.get(f"/v1/image-to-image/{job_id}").json()
            return job if job["status"] in ("completed", "failed", "canceled") else None

        job = wait_for(finished, 180, 0.5, "the job finished by the other coordinator")
        resumed_in = time.monotonic() - killed_at
    assert job["status"] == "completed", job
    assert len(job["images"]) == 2 and all(image["url"] for image in job["images"])
    # Released by the coordinator that finished it (a scan may hold it for a moment to see it is done).
    wait_for(lambda: _holder_pid(redis_server.url, job_id) is None, 30, 0.2, "the lease released")
    print(f"job resumed and finished {resumed_in:.1f} s after its coordinator was killed")


def test_redis_restarted_under_load_is_503_then_recovers_and_no_accepted_job_is_lost(
    stack, redis_server, plane
):
    with side_client(stack, plane) as client:
        jobs = []
        for seed in range(3):
            accepted = client.post(
                "/v1/image-to-image", json=body(seed=seed), headers={"Prefer": "respond-async"}
            )
            assert accepted.status_code == 202, accepted.text
            jobs.append(accepted.json()["id"])
        redis_server.stop()
        try:
            refused = client.post("/v1/image-to-image", json=body())
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 1
        finally:
            redis_server.start()
        wait_for(lambda: client.post("/v1/image-to-image", json=body()).status_code == 200, 60, 1, "recovery")

        def all_final():
            states = [client.get(f"/v1/image-to-image/{job}").json()["status"] for job in jobs]
            return states if all(s in ("completed", "failed", "canceled") for s in states) else None

        states = wait_for(all_final, 180, 1, "every accepted job finished")
    assert states == ["completed"] * 3
