"""Security round 2 (issue 13), findings 5, 7 and 8, pinned over HTTP against the in-process app:

* 5: a server-side failure (storage down, an engine exception, a lost replica) reaches the client as
  its code and a stable sentence, on every API and every path (sync, job record, SSE, usage); its
  real text (endpoint, bucket, object key, ``repr(exception)``) is logged once, server-side.
* 7: an idempotent replay is recognised before its source is fetched, decoded, stored or charged;
  ``/v1/usage`` reads one object per day, not per hour; event streams are capped per tenant and
  poll less often while nothing changes.
* 8: the API key is checked before the request body is read, on every API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from inference.errors import GenerationError
from serve.api import jobs as jobs_api
from serve.errors import ModelUnavailableError, StorageUnavailableError
from serve.tenancy.governor import TenantGovernor
from tests.support.asgi import body_then_disconnect, http_scope
from tests.unit.api_fakes import (
    AUTH,
    BASE_URL,
    TEST_ECHO,
    assert_error,
    build_app,
    data_url,
    image_bytes,
    rest_call,
)

REST = "/v1/image-to-image"
NODE = "/v1/nodes/image_to_image"
EDITS = "/v1/images/edits"
ASYNC = {**AUTH, "Prefer": "respond-async"}

#: Internal names a failure's own text carries, which no client may see.
ENDPOINT, BUCKET, OBJECT_KEY = (
    "minio.internal.svc:9000",
    "img2img-private-outputs",
    "tenant-z/2020/01/01/img_leaked/",
)
ENGINE_REPR = "RuntimeError('CUDA error: device-side assert triggered at /opt/engine/kernels.cu:412')"


def rest_body(**overrides):
    return {"image": data_url(64, 48), "prompt": "a lighthouse", "steps": 4, **overrides}


def call(client, api: str, headers=AUTH):
    """One synchronous request on one of the three image APIs."""
    if api == "rest":
        return client.post(REST, json=rest_body(), headers=headers)
    if api == "node":
        payload = {"source_image": data_url(64, 48), "prompt": "a fox", "negative_prompt": ""}
        return client.post(NODE, json=payload, headers=headers)
    upload = {"image": ("a.png", image_bytes(64, 48), "image/png")}
    return client.post(EDITS, data={"prompt": "a fox"}, files=upload, headers=headers)


def error_of(response, api: str) -> dict:
    """The error object of any API's envelope (OpenAI's has no details)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


def assert_no_internals(text: str) -> None:
    for internal in (
        ENDPOINT,
        BUCKET,
        OBJECT_KEY,
        "CUDA",
        "RuntimeError",
        "/opt/engine",
        "10.0.3.7",
        "RayActor",
    ):
        assert internal not in text, (internal, text)


def storage_down(*_args, **_kwargs):
    raise StorageUnavailableError(
        f"S3 at {ENDPOINT} is unreachable (store an object)",
        details=f"MaxRetryError: bucket {BUCKET!r} key {OBJECT_KEY}abc/source.png: Connection refused",
    )


async def async_storage_down(*args, **kwargs):
    storage_down()


# =============================================================== finding 5: internal details


@pytest.mark.parametrize("api", ["rest", "node", "openai"])
def test_storage_outage_503_names_no_endpoint_bucket_or_key_and_is_logged_once(
    client, app, monkeypatch, caplog, api
):
    monkeypatch.setattr(app.state.service.store, "put", async_storage_down)
    caplog.set_level(logging.WARNING)
    response = call(client, api)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    error = error_of(response, api)
    assert error["code"] == "storage_unavailable" and "retry" in error["message"]
    assert_no_internals(response.text)
    logged = [r for r in caplog.records if ENDPOINT in r.getMessage()]
    assert len(logged) == 1 and BUCKET in logged[0].getMessage()  # the operator still learns everything


@pytest.mark.parametrize("api", ["rest", "node", "openai"])
@pytest.mark.parametrize(
    "failure",
    [
        GenerationError("the engine failed", details=ENGINE_REPR),
        GenerationError("denoising failed", details=ENGINE_REPR, code="out_of_memory"),
        ModelUnavailableError("model sd-test replica is unavailable", details="RayActorError at 10.0.3.7"),
    ],
    ids=["engine", "oom", "replica"],
)
def test_engine_failures_reach_clients_as_a_stable_message_without_repr(
    client, backend, caplog, api, failure
):
    backend.error = failure
    caplog.set_level(logging.WARNING)
    first, second = call(client, api), call(client, api)
    assert first.status_code == second.status_code >= 500
    assert error_of(first, api) == error_of(second, api)  # stable: the same words every time
    assert_no_internals(first.text)
    assert failure.details in caplog.text


def test_a_failed_async_job_shows_no_internals_on_get_sse_or_the_idempotent_sync_path(
    client, backend, caplog
):
    backend.error = GenerationError("the engine failed", details=ENGINE_REPR)
    job = client.post(REST, json=rest_body(), headers=ASYNC).json()
    client.portal.call(client.app.state.jobs.drain)
    got = client.get(f"{REST}/{job['id']}", headers=AUTH)
    assert got.json()["status"] == "failed" and got.json()["error"]["code"] == "generation_failed"
    assert_no_internals(got.text)
    with client.stream("GET", f"{REST}/{job['id']}/events", headers=AUTH) as stream:
        events = "\n".join(stream.iter_lines())
    assert "event: failed" in events
    assert_no_internals(events)
    sync = client.post(REST, json=rest_body(seed=1), headers={**AUTH, "Idempotency-Key": "k-1"})
    assert_error(sync, 500, "generation_failed")
    assert_no_internals(sync.text)
    assert caplog.text.count("device-side assert") == 2  # once per failed job, never per read


def test_job_reads_and_usage_with_storage_down_are_generic_503s(client, app, monkeypatch):
    job = client.post(REST, json=rest_body(), headers=ASYNC).json()
    client.portal.call(client.app.state.jobs.drain)
    monkeypatch.setattr(app.state.service.store, "get", async_storage_down)
    app.state.usage.governor.store = app.state.service.store
    for response in (
        client.get(f"{REST}/{job['id']}", headers=AUTH),
        client.delete(f"{REST}/{job['id']}", headers=AUTH),
        client.get(f"{REST}/{job['id']}/events", headers=AUTH),
        client.get("/v1/usage", headers=AUTH),
    ):
        assert_error(response, 503, "storage_unavailable")
        assert_no_internals(response.text)


def test_an_event_stream_whose_store_fails_mid_stream_ends_with_a_generic_error_event(
    client, app, backend, monkeypatch
):
    backend.gate = client.portal.call(asyncio.Event)  # the job stays processing
    job = client.post(REST, json=rest_body(), headers=ASYNC).json()
    for _ in range(500):  # the runner's own reads are done once it waits at the gate, processing
        if client.get(f"{REST}/{job['id']}", headers=AUTH).json()["status"] == "processing":
            break
        time.sleep(0.01)
    real_get, reads = app.state.service.store.get, []

    async def fails_after_two(key):
        reads.append(key)
        if len(reads) > 2:
            storage_down()
        return await real_get(key)

    monkeypatch.setattr(app.state.service.store, "get", fails_after_two)
    monkeypatch.setattr(jobs_api, "EVENTS_POLL_S", 0.01)
    with client.stream("GET", f"{REST}/{job['id']}/events", headers=AUTH) as stream:
        events = "\n".join(stream.iter_lines())
    client.portal.call(backend.gate.set)
    assert "event: error" in events and "storage_unavailable" in events
    assert_no_internals(events)


# =============================================================== finding 7: amplification


class CountingAdmission:
    """Wraps the app's admission: how many times a request was charged against the rate limit."""

    def __init__(self, inner) -> None:
        self.inner, self.admitted = inner, []

    async def admit(self, tenant, request_id, images, limits):
        self.admitted.append(images)
        await self.inner.admit(tenant, request_id, images, limits)

    async def release(self, tenant, request_id, usage):
        await self.inner.release(tenant, request_id, usage)


def _source_objects(app) -> list:
    root = app.state.service.store.root
    return sorted(p for p in root.rglob("source.*") if p.is_file())


@pytest.mark.parametrize("prefer", ["respond-async", None], ids=["async", "sync"])
def test_one_request_and_three_replays_store_one_source_and_charge_once(client, app, backend, prefer):
    counting = app.state.service.admission = CountingAdmission(app.state.service.admission)
    headers = {**AUTH, "Idempotency-Key": "order-7", **({"Prefer": prefer} if prefer else {})}
    payload = rest_body(seed=3, num_images=2)
    ids = []
    for _ in range(4):  # the request, then three replays
        response = client.post(REST, json=payload, headers=headers)
        assert response.status_code in (200, 202), response.text
        ids.append(response.json()["id"])
        client.portal.call(app.state.jobs.drain)
    assert len(set(ids)) == 1
    assert len(_source_objects(app)) == 1  # was 4
    assert counting.admitted == [2]  # charged once (2 images); was 4 times
    assert len(backend.calls) == 1


def test_a_url_source_is_fetched_once_for_a_request_and_its_replays(client, app, fake_fetch):
    headers = {**ASYNC, "Idempotency-Key": "order-8"}
    for _ in range(4):
        assert client.post(REST, json=rest_body(image="https://images.example.com/a.jpg"), headers=headers)
        client.portal.call(app.state.jobs.drain)
    assert fake_fetch.urls == ["https://images.example.com/a.jpg"]


def test_a_replay_with_another_body_is_a_409_before_any_work(client, app, fake_fetch):
    counting = app.state.service.admission = CountingAdmission(app.state.service.admission)
    headers = {**ASYNC, "Idempotency-Key": "order-9"}
    assert client.post(REST, json=rest_body(seed=1), headers=headers).status_code == 202
    changed = client.post(
        REST, json=rest_body(seed=2, image="https://images.example.com/b.jpg"), headers=headers
    )
    assert_error(changed, 409, "idempotency_conflict")
    assert fake_fetch.urls == [] and len(counting.admitted) == 1


def test_a_racing_duplicate_leaves_no_orphaned_source(client, app):
    """Two first requests with one key race past the ingress check: the coordinator keeps the first,
    the loser's stored source is deleted."""
    service, runner = app.state.service, app.state.jobs
    from serve.jobs.records import new_record

    async def race():
        records = []
        for _ in range(2):
            job = rest_call(data_url(64, 48), seed=1)
            prepared = await service.store_source(await service.prepare(job))
            records.append((prepared, new_record(prepared, TEST_ECHO, None)))
        winner = await runner.accept(records[0][1], ("race", "fp"))
        loser = await runner.accept(records[1][1], ("race", "fp"))
        assert winner == loser == records[0][1].id
        await service.release(records[1][0].call, None)
        await service.discard_source(records[1][0])
        await runner.drain()

    client.portal.call(race)
    assert len(_source_objects(app)) == 1


class CountingStore:
    def __init__(self, inner) -> None:
        self.inner, self.gets = inner, 0

    async def get(self, key):
        self.gets += 1
        return await self.inner.get(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_usage_over_31_days_reads_one_object_per_day(client, app):
    governor: TenantGovernor = app.state.usage.governor
    governor.store = store = CountingStore(app.state.service.store)
    assert client.post(REST, json=rest_body(num_images=2), headers=AUTH).status_code == 200
    client.portal.call(governor.flush)
    end = datetime.now(UTC)
    query = {"start": (end - timedelta(days=31)).isoformat(), "end": end.isoformat()}
    fresh = TenantGovernor(store=store)  # a restarted governor: nothing cached
    store.gets = 0
    app.state.usage.governor = fresh
    response = client.get("/v1/usage", params=query, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["requests"] == 1 and response.json()["images"] == 2
    assert store.gets == 32  # one per UTC day spanned; was 745 (one per hour)


def test_usage_rollups_add_up_across_a_restart_and_unflushed_usage(tmp_path):
    from serve.storage.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path, "http://x", b"0123456789abcdef")
    first = TenantGovernor(store=store)
    first.release("t", "r1", {"requests": 1, "images": 2, "steps": 30, "compute_seconds": 0.5})
    asyncio.run(first.flush())
    later = TenantGovernor(store=store)  # restarted within the same hour: must add, not overwrite
    later.release("t", "r2", {"requests": 1, "images": 1, "steps": 10, "compute_seconds": 0.25})
    now = datetime.now(UTC)
    unflushed = asyncio.run(later.usage("t", now - timedelta(hours=1), now))
    asyncio.run(later.flush())
    flushed = asyncio.run(TenantGovernor(store=store).usage("t", now - timedelta(hours=1), now))
    assert unflushed == flushed == {"requests": 2, "images": 3, "steps": 40, "compute_seconds": 0.75}


@pytest.mark.parametrize("damage", [b"{not json", b'{"hours": []}', b'{"hours": {"h": {"images": "x"}}}'])
def test_a_damaged_usage_object_is_kept_aside_and_neither_fails_usage_nor_later_flushes(tmp_path, damage):
    """The same class as a malformed tenant record (finding 11): one bad object must not make
    /v1/usage a 500 or stop the day's later flushes; its bytes are kept for an operator."""
    from serve.storage.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path, "http://x", b"0123456789abcdef")
    now = datetime.now(UTC)
    day_key = f"_usage/t/{now:%Y-%m-%d}.json"
    asyncio.run(store.put(day_key, damage, "application/json"))
    governor = TenantGovernor(store=store)
    governor.release("t", "r1", {"requests": 1, "images": 2, "steps": 30, "compute_seconds": 0.5})
    asyncio.run(governor.flush())
    totals = asyncio.run(TenantGovernor(store=store).usage("t", now - timedelta(hours=1), now))
    assert totals["requests"] == 1 and totals["images"] == 2
    kept = [key for key in asyncio.run(store.list("_usage/t/")) if ".damaged-" in key]
    assert len(kept) == 1 and asyncio.run(store.get(kept[0])) == damage


def test_event_stream_polling_backs_off_while_nothing_changes(client, app, backend, monkeypatch):
    backend.gate = client.portal.call(asyncio.Event)  # processing, progress 1 step, then nothing changes
    job = client.post(REST, json=rest_body(), headers=ASYNC).json()
    monkeypatch.setattr(jobs_api, "EVENTS_POLL_S", 0.01)
    monkeypatch.setattr(jobs_api, "EVENTS_POLL_MAX_S", 0.08)
    monkeypatch.setattr(jobs_api, "EVENTS_MAX_S", 0.6)
    job_store, loads = app.state.job_store, []
    real_load = job_store.load

    async def counted(tenant, job_id):
        loads.append(asyncio.get_running_loop().time())
        return await real_load(tenant, job_id)

    monkeypatch.setattr(job_store, "load", counted)
    with client.stream("GET", f"{REST}/{job['id']}/events", headers=AUTH) as stream:
        assert stream.status_code == 200
        list(stream.iter_lines())
    client.portal.call(backend.gate.set)
    # without back-off: 0.6 s / 0.01 s = 60 reads; with it: 0.01, 0.02, 0.04, then every 0.08 s
    assert len(loads) <= 15, len(loads)
    gaps = [b - a for a, b in itertools.pairwise(loads[1:])]
    assert max(gaps) >= 0.07  # waits grew to the cap (a sleep is never shorter than asked)


def test_at_the_real_settings_a_stuck_job_is_polled_about_190_times_in_15_minutes_not_1800():
    delays, elapsed, polls = (
        jobs_api.poll_delays(jobs_api.EVENTS_POLL_S, jobs_api.EVENTS_BACKOFF, jobs_api.EVENTS_POLL_MAX_S),
        0.0,
        1,
    )
    while elapsed < jobs_api.EVENTS_MAX_S:
        elapsed += next(delays)
        polls += 1
    assert polls <= 190  # was EVENTS_MAX_S / 0.5 = 1800


async def _open_stream(app, path: str, headers: dict[str, str]):
    """An event stream held open over raw ASGI (test clients buffer whole responses): returns its
    status once headers are sent, the task and a function that disconnects the client."""
    started = asyncio.Event()
    status: list[int] = []
    receive, gone = body_then_disconnect()

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
            started.set()

    task = asyncio.create_task(app(http_scope("GET", path, headers), receive, send))
    await asyncio.wait_for(started.wait(), 5)
    return status[0], task, gone.set


@pytest.mark.anyio
async def test_event_streams_are_capped_per_tenant_with_a_429_and_a_closed_one_frees_its_slot(tmp_path):
    app = build_app(tmp_path)
    app.state.event_streams_per_tenant = 2
    service = app.state.service
    from serve.jobs.records import new_record

    job = rest_call(data_url(64, 48), seed=1)
    prepared = await service.store_source(await service.prepare(job))
    await app.state.job_store.save(new_record(prepared, TEST_ECHO, None))  # queued, never runs
    path = f"{REST}/{job.id}/events"
    first = await _open_stream(app, path, AUTH)
    second = await _open_stream(app, path, AUTH)
    assert first[0] == second[0] == 200
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        refused = await http.get(path, headers=AUTH)
        assert_error(refused, 429, "rate_limited")
        assert int(refused.headers["Retry-After"]) >= 1
        first[2]()  # the first client goes away: its slot is given back
        await asyncio.wait_for(first[1], 5)
        third = await _open_stream(app, path, AUTH)
        assert third[0] == 200
    for _, task, disconnect in (second, third):
        disconnect()
        await asyncio.wait_for(task, 5)
    assert app.state.event_streams.open == {}


# =============================================================== finding 8: authenticate first

FIFTEEN_MB = 15 * 1024 * 1024


def _counting_body(total: int, chunk: int = 64 * 1024):
    """A request body streamed in chunks, counting the bytes the app pulled from it."""
    pulled = [0]

    async def body():
        while pulled[0] < total:
            size = min(chunk, total - pulled[0])
            pulled[0] += size
            yield b"x" * size

    return body(), pulled


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "content_type", "code"),
    [
        (REST, "application/json", "unauthorized"),
        (NODE, "application/json", "invalid_connection"),
        (EDITS, "multipart/form-data; boundary=xyz", "invalid_api_key"),
        (f"{REST}/img_x", "application/json", "unauthorized"),
    ],
    ids=["rest", "node", "openai-multipart", "jobs"],
)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer not-a-key", "Basic abc"], ids=["none", "bad", "basic"]
)
async def test_an_unauthenticated_15_mb_body_is_never_read(tmp_path, path, content_type, code, authorization):
    app = build_app(tmp_path)
    content, pulled = _counting_body(FIFTEEN_MB)
    headers = {"Content-Type": content_type, **({"Authorization": authorization} if authorization else {})}
    method = "DELETE" if path.endswith("img_x") else "POST"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        response = await http.request(method, path, content=content, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == code  # in the API's own envelope
    assert pulled[0] == 0  # not one byte of the body was received


@pytest.mark.anyio
async def test_an_authenticated_body_is_still_read_and_parsed(tmp_path):
    app = build_app(tmp_path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        response = await http.post(
            EDITS, data={"prompt": "x"}, files={"image": ("a.png", image_bytes(), "image/png")}, headers=AUTH
        )
    assert response.status_code == 200, response.text


def test_an_unauthenticated_multipart_upload_over_http_is_a_fast_401(tmp_path):
    app = build_app(tmp_path)
    seen = [0]

    async def counting_app(scope, receive, send):
        async def counted():
            message = await receive()
            seen[0] += len(message.get("body", b""))
            return message

        await app(scope, counted, send)

    upload = {"image": ("big.png", b"\0" * FIFTEEN_MB, "image/png")}
    with TestClient(counting_app, raise_server_exceptions=False) as http:
        response = http.post(
            EDITS, data={"prompt": "x"}, files=upload, headers={"Authorization": "Bearer nope"}
        )
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert seen[0] == 0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
