"""Durable jobs shared by several coordinators through Redis leases (a real ``redis-server``): a lost
lease stops its holder without a word written, a stale holder that wakes up cannot overwrite the newer
holder's result (fencing tokens), and an Idempotency-Key is won by exactly one coordinator.

The coordinators here are ``JobRunner`` objects in one process over one object store and one Redis,
as two replicas are over S3 and Redis; ``test_control_plane_stack.py`` kills a real replica."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from serve.errors import IdempotencyConflictError
from serve.jobs.leases import RedisLeases
from serve.jobs.records import JobState, new_record
from serve.jobs.runner import JobRunner
from tests.unit.api_fakes import TENANT, TEST_ECHO, build_app, data_url, rest_call


@pytest.fixture
def world(redis_server, tmp_path):
    redis_server.flush()
    app = build_app(tmp_path)
    return app, redis_server.url


def coordinator(app, url: str, owner: str, lease_s: float = 1.0) -> JobRunner:
    local = app.state.jobs  # the in-process runner build_app made: same service, store and renderer
    return JobRunner(
        app.state.service,
        app.state.job_store,
        local.render,
        leases=RedisLeases.from_url(url, lease_s, owner=owner),
    )


async def accepted(app, runner: JobRunner, idempotency=None) -> str:
    service = app.state.service
    prepared = await service.store_source(await service.prepare(rest_call(data_url(64, 48), seed=3)))
    return await runner.accept(new_record(prepared, TEST_ECHO, None), idempotency)


async def until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.02)


def test_a_lost_lease_stops_its_holder_silently_and_another_coordinator_finishes_the_job(world):
    app, url = world
    backend = app.state.service.backend

    async def scenario():
        backend.gate = asyncio.Event()
        a, b = coordinator(app, url, "a"), coordinator(app, url, "b")
        job_id = await accepted(app, a)
        await until(lambda: asyncio.sleep(0, bool(backend.calls)))  # a is generating
        await aioredis.Redis.from_url(url).delete(f"img2img:lease:{job_id}")  # a's lease is gone
        await until(lambda: asyncio.sleep(0, job_id not in a._tasks))  # a noticed and stopped
        stopped = await app.state.job_store.load(TENANT, job_id)
        backend.gate.set()
        assert await b.resume() == 1  # b's scan claims the orphan
        await b.drain()
        return stopped, await app.state.job_store.load(TENANT, job_id)

    stopped, final = asyncio.run(scenario())
    assert (stopped.status, stopped.lease_token) == (JobState.PROCESSING, 1)  # a wrote nothing more
    assert (final.status, final.lease_token, final.run_attempts) == (JobState.COMPLETED, 2, 2)
    assert len(final.images) == 1


def test_a_stale_holder_that_wakes_up_cannot_overwrite_the_newer_holders_result(world):
    app, url = world
    backend = app.state.service.backend

    async def scenario():
        backend.gate = asyncio.Event()
        a, b = coordinator(app, url, "a"), coordinator(app, url, "b")

        async def believes_it_still_holds(job_id, token):  # a is paused (GC, partition): never checks
            return True

        a.leases.renew = believes_it_still_holds
        job_id = await accepted(app, a)
        await until(lambda: asyncio.sleep(0, bool(backend.calls)))
        await aioredis.Redis.from_url(url).delete(f"img2img:lease:{job_id}")  # a's lease expired
        await b.resume()  # b claims with token 2 and starts generating too
        await until(lambda: asyncio.sleep(0, len(backend.calls) == 2))
        backend.gate.set()  # both finish generating; b's record holds token 2
        await asyncio.gather(a.drain(), b.drain())
        return await app.state.job_store.load(TENANT, job_id)

    final = asyncio.run(scenario())
    assert (final.status, final.lease_token) == (JobState.COMPLETED, 2)  # b's, not overwritten by a
    assert final.run_attempts == 2


def test_one_idempotency_key_sent_to_two_coordinators_at_once_makes_one_job(world):
    app, url = world

    async def scenario():
        a, b = coordinator(app, url, "a"), coordinator(app, url, "b")
        ids = await asyncio.gather(accepted(app, a, ("order-7", "fp")), accepted(app, b, ("order-7", "fp")))
        with pytest.raises(IdempotencyConflictError):
            await accepted(app, b, ("order-7", "another body"))
        await asyncio.gather(a.drain(), b.drain())
        return ids, await app.state.job_store.pending()

    ids, pending = asyncio.run(scenario())
    assert ids[0] == ids[1]
    assert pending == []


def test_a_redis_that_lost_its_data_still_fences_a_stale_holder(world, redis_server):
    """Redis restarted without persistence: every lease and fencing counter is gone, so a new claim
    would get token 1 again. The stored record's token wins: the new holder takes a token above it, and
    the old holder (who still believes in its lease) cannot overwrite the result."""
    app, url = world
    backend = app.state.service.backend

    async def scenario():
        backend.gate = asyncio.Event()
        a, b = coordinator(app, url, "a"), coordinator(app, url, "b")

        async def believes_it_still_holds(job_id, token):
            return True

        a.leases.renew = believes_it_still_holds
        job_id = await accepted(app, a)
        await until(lambda: asyncio.sleep(0, bool(backend.calls)))
        await aioredis.Redis.from_url(url).flushall()  # leases and fencing counters are lost
        await b.resume()  # claims token 1 again, sees the stored token 1, takes 2
        await until(lambda: asyncio.sleep(0, len(backend.calls) == 2))
        backend.gate.set()
        await asyncio.gather(a.drain(), b.drain())
        return await app.state.job_store.load(TENANT, job_id)

    final = asyncio.run(scenario())
    assert (final.status, final.lease_token) == (JobState.COMPLETED, 2)
