"""The Redis limiter against a real ``redis-server``: exact across processes, slots that expire,
usage that flushes idempotently, and a Redis outage that fails closed and then recovers."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from datetime import UTC, datetime, timedelta

import pytest

from serve.errors import OverloadedError, RateLimitedError
from serve.storage.objects import LocalObjectStore
from serve.tenancy.governor import Limits, day_key, parse_day
from serve.tenancy.redis_limits import RedisLimits

SIGNING_KEY = b"redis-limits-test-signing-key"


@pytest.fixture
def limits(redis_server, tmp_path):
    redis_server.flush()
    store = LocalObjectStore(tmp_path / "store", "http://x", SIGNING_KEY)
    return RedisLimits.from_url(redis_server.url, store, slot_ttl_s=60)


def run(coroutine):
    return asyncio.run(coroutine)


def _replica(url: str, tenant: str, attempts: int, start_at: float, admitted) -> None:
    """One 'ingress replica': its own process and connection, firing at the same instant as the others."""

    async def burst() -> int:
        limiter = RedisLimits.from_url(url, None)
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        results = await asyncio.gather(
            *(
                limiter.admit(tenant, f"r{i}-{id(limiter)}", 1, Limits(images_per_minute=10))
                for i in range(attempts)
            ),
            return_exceptions=True,
        )
        return sum(result is None for result in results)

    admitted.put(asyncio.run(burst()))


def test_four_replicas_bursting_at_once_admit_exactly_the_limit(redis_server):
    redis_server.flush()
    context = multiprocessing.get_context("spawn")
    admitted = context.Queue()
    start_at = time.time() + 3.0  # every process connected and waiting before the burst
    workers = [
        context.Process(target=_replica, args=(redis_server.url, "burst", 10, start_at, admitted))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    counts = [admitted.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sum(counts) == 10, counts  # 40 attempts against 10 images/minute: exactly 10, never 11


def test_a_refused_admission_says_when_to_retry(limits):
    async def scenario():
        await limits.admit("acme", "a", 3, Limits(images_per_minute=3))
        with pytest.raises(RateLimitedError) as refused:
            await limits.admit("acme", "b", 1, Limits(images_per_minute=3))
        return refused.value

    refused = run(scenario())
    assert 15 <= refused.retry_after_s <= 21  # one image of a 3/minute bucket: ~20 s
    assert refused.status == 429


def test_concurrency_slots_are_freed_by_release_and_a_leaked_one_expires_on_its_own(redis_server, tmp_path):
    redis_server.flush()
    limits = RedisLimits.from_url(redis_server.url, None, slot_ttl_s=1.0)
    two = Limits(concurrency=2)

    async def scenario():
        await limits.admit("acme", "a", 1, two)
        await limits.admit("acme", "leaked", 1, two)  # its ingress 'crashes': never released
        with pytest.raises(RateLimitedError):
            await limits.admit("acme", "c", 1, two)
        await limits.release("acme", "a", None)
        await limits.admit("acme", "c", 1, two)  # a released slot is free at once
        with pytest.raises(RateLimitedError):
            await limits.admit("acme", "d", 1, two)
        began = time.monotonic()
        while True:  # the leaked slot expires within slot_ttl_s of its admission
            try:
                await limits.admit("acme", "d", 1, two)
                return time.monotonic() - began
            except RateLimitedError:
                await asyncio.sleep(0.05)

    waited = run(scenario())
    assert waited <= 1.2, waited


def test_usage_is_read_hot_from_redis_and_flushed_idempotently(limits, tmp_path):
    usage = {"requests": 1, "images": 2, "steps": 40, "compute_seconds": 1.5}
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC)

    async def scenario():
        for i in range(3):
            await limits.admit("acme", f"r{i}", 2, Limits())
            await limits.release("acme", f"r{i}", usage)
        hot = await limits.usage("acme", start, end)
        assert await limits.flush() == 1
        assert await limits.flush() == 1  # a second flusher (or a rerun) writes the same totals
        day = parse_day(await limits.store.get(day_key("acme", datetime.now(UTC).strftime("%Y-%m-%d"))))
        return hot, day, await limits.usage("acme", start, end)

    hot, day, after = run(scenario())
    assert hot == {"requests": 3.0, "images": 6.0, "steps": 120.0, "compute_seconds": 4.5}
    assert list(day.values()) == [hot]  # the stored hour holds the absolute totals, not a sum of flushes
    assert after == hot


def test_a_settled_hour_leaves_redis_once_flushed_and_reads_from_the_store(limits):
    past = datetime.now(UTC) - timedelta(hours=5)
    limits.clock = lambda: past  # releases land in an hour five hours ago

    async def scenario():
        await limits.release("acme", "old", {"requests": 1, "images": 4})
        limits.clock = lambda: datetime.now(UTC)
        await limits.flush()
        left = await limits.client.keys("img2img:usage:acme:*")
        return left, await limits.usage("acme", past - timedelta(hours=1), datetime.now(UTC))

    left, totals = run(scenario())
    assert left == []
    assert (totals["requests"], totals["images"]) == (1.0, 4.0)


def test_redis_down_fails_closed_with_a_retry_after_then_recovers(redis_server):
    redis_server.flush()
    limits = RedisLimits.from_url(redis_server.url, None)

    async def scenario():
        await limits.admit("acme", "before", 1, Limits())
        await asyncio.to_thread(redis_server.stop)
        try:
            with pytest.raises(OverloadedError) as refused:
                await limits.admit("acme", "during", 1, Limits())
            await limits.release("acme", "before", {"requests": 1})  # kept, not raised: sent again later
            kept = list(limits._unsent)
        finally:
            await asyncio.to_thread(redis_server.start)
        await limits.admit("acme", "after", 1, Limits())
        await limits.release("acme", "after", {"requests": 1})
        totals = await limits.usage("acme", datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC))
        return refused.value, kept, list(limits._unsent), totals

    refused, kept, left, totals = run(scenario())
    assert refused.status == 503 and refused.retry_after_s == 2
    assert [item[1] for item in kept] == ["before"] and left == []
    assert totals["requests"] == 2.0  # the release kept during the outage was not lost
