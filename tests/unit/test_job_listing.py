"""``GET /v1/image-to-image``: the caller's jobs, newest first, with cursor pagination and a status
filter; job ids are time-ordered so the store's prefix listing is the order; another tenant's jobs
never appear."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.storage.objects import new_job_id
from serve.tenancy.keys import hash_key
from serve.tenancy.tenants import Tenant, TenantStore
from tests.unit.api_fakes import AUTH, assert_error, data_url

URL = "/v1/image-to-image"
KEY_B = "sk-listing-tenant-b-9Kq2xLp7Zr"
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def two_tenants(app, client):
    client.portal.call(
        TenantStore(app.state.service.store).save, Tenant(name="tenant-b", key_hashes=[hash_key(KEY_B)])
    )
    client.portal.call(app.state.tenants.refresh)


def submit(client, auth, prompt: str, *, durable: bool = False) -> str:
    headers = {**auth, "Prefer": "respond-async"} if durable else auth
    response = client.post(URL, json={"image": data_url(), "prompt": prompt, "steps": 2}, headers=headers)
    assert response.status_code in (200, 202), response.text
    return response.json()["id"]


def test_job_ids_sort_by_creation_time():
    ids = [new_job_id(1_700_000_000_000 + step) for step in (0, 1, 999, 86_400_000)]
    assert ids == sorted(ids) and len({i[:13] for i in ids}) == 4 and all(len(i) == 26 for i in ids)
    assert new_job_id(5) != new_job_id(5)  # the random part keeps ids of one millisecond apart


def test_each_tenant_lists_only_its_own_jobs_newest_first_page_by_page(client, app, two_tenants):
    mine = []
    for i in range(5):
        mine.append(submit(client, AUTH, f"mine {i}"))
        if i == 2:
            theirs = [submit(client, AUTH_B, "theirs a"), submit(client, AUTH_B, "theirs b")]
        asyncio.run(asyncio.sleep(0.002))  # distinct milliseconds, as separate requests have
    first = client.get(URL, params={"limit": 2}, headers=AUTH).json()
    assert [job["id"] for job in first["data"]] == mine[::-1][:2]
    assert first["has_more"] and first["next_after"] == mine[3]
    second = client.get(URL, params={"limit": 2, "after": first["next_after"]}, headers=AUTH).json()
    third = client.get(URL, params={"limit": 2, "after": second["next_after"]}, headers=AUTH).json()
    assert [job["id"] for job in second["data"] + third["data"]] == mine[::-1][2:]
    assert third["has_more"] is False and third["next_after"] is None
    listed_b = client.get(URL, headers=AUTH_B).json()
    assert [job["id"] for job in listed_b["data"]] == theirs[::-1]
    assert all(job["prompt"].startswith("mine") for job in first["data"] + second["data"] + third["data"])


def test_a_status_filter_and_bad_parameters(client, app, two_tenants):
    backend = app.state.service.backend
    done = submit(client, AUTH, "done")
    backend.gate = client.portal.call(asyncio.Event)
    waiting = submit(client, AUTH, "waiting", durable=True)
    try:
        for _ in range(200):  # until the runner has picked it up (queued -> processing)
            if client.get(f"{URL}/{waiting}", headers=AUTH).json()["status"] == "processing":
                break
            time.sleep(0.01)
        processing = client.get(URL, params={"status": "processing"}, headers=AUTH).json()["data"]
        assert [job["id"] for job in processing] == [waiting]
        assert client.get(URL, params={"status": "queued"}, headers=AUTH).json()["data"] == []
        completed = client.get(URL, params={"status": "completed"}, headers=AUTH).json()["data"]
        assert [job["id"] for job in completed] == [done]
    finally:
        client.portal.call(backend.gate.set)
        client.portal.call(app.state.jobs.drain)
    assert_error(client.get(URL, params={"status": "sleeping"}, headers=AUTH), 400, "invalid_parameter")
    assert_error(client.get(URL, params={"limit": 0}, headers=AUTH), 400, "invalid_parameter")
    assert_error(client.get(URL, params={"after": "../x"}, headers=AUTH), 400, "invalid_parameter")
    assert client.get(URL).status_code == 401


def test_an_expired_job_id_is_410_and_one_that_never_was_404(client):
    old = new_job_id(int((time.time() - 40 * 86400) * 1000))  # default retention: 30 days
    expired = client.get(f"{URL}/{old}", headers=AUTH)
    assert_error(expired, 410, "expired", param="id", mentions=["30-day retention"])
    assert_error(client.get(f"{URL}/{new_job_id()}", headers=AUTH), 404, "not_found")
    assert_error(client.delete(f"{URL}/{old}", headers=AUTH), 410, "expired")


def test_the_local_store_sweeps_too(app, client):
    from datetime import UTC, datetime, timedelta

    from serve.jobs.retention import RetentionSweeper
    from serve.storage.objects import object_key
    from serve.tenancy.tenants import Tenant

    store = app.state.service.store
    made = datetime.now(UTC) - timedelta(days=40)
    old = object_key("tenant-a", new_job_id(int(made.timestamp() * 1000)), 0, "png", now=made)
    young = submit(client, AUTH, "kept")
    client.portal.call(store.put, old, b"x", "image/png")
    sweeper = RetentionSweeper(store, lambda: [Tenant(name="tenant-a", retention_days=30)])
    assert client.portal.call(sweeper.sweep) == 1
    assert old not in client.portal.call(store.list, "tenant-a/")
    assert client.get(f"{URL}/{young}", headers=AUTH).status_code == 200


def test_the_coordinators_sweeper_sees_every_tenant(app, client):
    """What ``JobCoordinator`` hands its ``RetentionSweeper``: every tenant of the catalog."""
    names = {tenant.name for tenant in app.state.tenants.all()}
    assert names == {"tenant-a"}
    assert app.state.tenants.directory.lookup("tenant-a") is not None
