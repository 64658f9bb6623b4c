"""Per-tenant limits and usage in Redis: what every ingress replica calls, with no governor hop.

Why Redis: one governor replica tops out at a few hundred admit+release pairs a second, whatever the
number of GPUs. Here each ingress replica runs one atomic server-side script per admission, so
limits stay exact across any number of replicas (a burst against N images/minute admits exactly N)
and throughput is Redis's. Production already runs this Redis for Ray's GCS fault tolerance.

* Concurrency: a sorted set per tenant of in-flight request ids, scored by when each slot expires. A
  slot never released (its ingress crashed) stops counting after ``slot_ttl_s``: every admission
  first drops expired slots, so a leak heals within that bound.
* Rate: a token bucket per tenant (tokens, last update), refilled from Redis's own clock (``TIME``),
  so replicas with skewed clocks share one time.
* Usage: each release adds its figures to an hourly hash; ``flush`` writes those hours' absolute
  totals into the same day objects ``TenantGovernor`` writes (``_usage/{tenant}/{day}.json``), so a
  flusher that dies mid-way and one that runs twice leave the same result (idempotent). ``usage``
  reads hours still in Redis from Redis and the rest from the store.
* Redis unreachable: admissions fail closed with 503 and Retry-After (nobody's limits could be held);
  a release that cannot reach Redis is kept and sent again with the next one (its slot expires anyway).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from serve.errors import OverloadedError, RateLimitedError
from serve.storage.objects import ConcurrentWriteError, ObjectNotFoundError, ObjectStore
from serve.storage.redis import connect
from serve.tenancy.governor import USAGE_FIELDS, Limits, day_key, hour_of, hours_between, parse_day

logger = logging.getLogger(__name__)

PREFIX = "img2img"
USAGE_KEY_TTL_S = 8 * 24 * 3600  # an hour never flushed (no flusher ran for a week) still goes away
SETTLED_AFTER_S = 2 * 3600  # an hour this long past is complete: once flushed, Redis forgets it
FLUSH_RETRIES = 5  # a day object changed by another flusher between read and write: read it again

#: KEYS: slots, bucket. ARGV: request id, images, concurrency (-1: none), images/minute (-1: none),
#: slot ttl ms. Returns {0} admitted, {1, held} over concurrency, {2, wait ms} over rate.
ADMIT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local images, concurrency = tonumber(ARGV[2]), tonumber(ARGV[3])
local per_minute, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if concurrency >= 0 then
  local held = redis.call('ZCARD', KEYS[1])
  if held >= concurrency then return {1, held} end
end
if per_minute >= 0 then
  local state = redis.call('HMGET', KEYS[2], 'tokens', 'updated')
  local tokens = tonumber(state[1]) or per_minute
  local updated = tonumber(state[2]) or now
  tokens = math.min(per_minute, tokens + (now - updated) * per_minute / 60000)
  if tokens < images then
    redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'updated', now)
    return {2, tostring(math.ceil((images - tokens) * 60000 / per_minute))}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - images), 'updated', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return {0}
"""


#: KEYS: slots, the hour's usage hash, the set of unsettled hours. ARGV: request id, "tenant|hour",
#: usage ttl s, then (field, amount) pairs. One round trip and one script: a release costs the ingress
#: half the CPU of the same commands sent as a MULTI transaction (benchmarks/control_plane.py).
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if #ARGV > 3 then
  for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[2])
end
return 1
"""


def _hour_key(tenant: str, hour: str) -> str:
    return f"{PREFIX}:usage:{tenant}:{hour}"


HOURS_KEY = f"{PREFIX}:usage:hours"  # "tenant|hour" of every hour with counts not yet settled


class RedisLimits:
    """``Admission`` (and ``/v1/usage``) over Redis; one instance per process."""

    def __init__(
        self,
        client: redis.Redis,
        store: ObjectStore | None,
        slot_ttl_s: float = 900,
        metrics: Any = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.client, self.store, self.metrics, self.clock = client, store, metrics, clock
        self.slot_ttl_ms = int(slot_ttl_s * 1000)
        self._admit = client.register_script(ADMIT)
        self._release = client.register_script(RELEASE)
        self._unsent: list[tuple[str, str, dict[str, float] | None]] = []

    @classmethod
    def from_url(cls, url: str, store: ObjectStore | None, **options: Any) -> RedisLimits:
        return cls(connect(url), store, **options)

    async def admit(self, tenant: str, request_id: str, images: int, limits: Limits) -> None:
        args = [
            request_id,
            images,
            -1 if limits.concurrency is None else limits.concurrency,
            -1 if limits.images_per_minute is None else limits.images_per_minute,
            self.slot_ttl_ms,
        ]
        try:
            answer = await self._admit(
                keys=[f"{PREFIX}:slots:{tenant}", f"{PREFIX}:bucket:{tenant}"], args=args
            )
        except RedisError as error:
            raise _unavailable(error) from None
        verdict = int(answer[0])
        if verdict == 1:
            raise RateLimitedError(
                f"tenant {tenant!r} has {int(answer[1])} requests in flight (limit {limits.concurrency})",
                retry_after_s=1.0,
            )
        if verdict == 2:
            raise RateLimitedError(
                f"tenant {tenant!r} is over its rate limit of {limits.images_per_minute:g} images/minute",
                retry_after_s=float(answer[1]) / 1000,
            )

    async def release(self, tenant: str, request_id: str, usage: dict[str, float] | None) -> None:
        try:
            await self._send_release(tenant, request_id, usage)
        except RedisError as error:
            self._unsent = [*self._unsent, (tenant, request_id, usage)][-1000:]  # bounded
            logger.warning("could not release request %s in Redis yet: %s", request_id, error)
            return
        if usage and self.metrics is not None:
            self.metrics.tenant_usage(tenant, usage)
        if self._unsent:  # Redis answers again: send what an outage kept (taken whole: sent once)
            kept, self._unsent = self._unsent, []
            for index, item in enumerate(kept):
                try:
                    await self._send_release(*item)
                except RedisError:
                    self._unsent = kept[index:] + self._unsent
                    return

    async def _send_release(self, tenant: str, request_id: str, usage: dict[str, float] | None) -> None:
        hour = hour_of(self.clock())
        figures = [
            value for name in USAGE_FIELDS if (usage or {}).get(name) for value in (name, float(usage[name]))
        ]
        keys = [f"{PREFIX}:slots:{tenant}", _hour_key(tenant, hour), HOURS_KEY]
        await self._release(keys=keys, args=[request_id, f"{tenant}|{hour}", USAGE_KEY_TTL_S, *figures])

    async def in_flight(self, tenant: str) -> int:
        now_ms = int(time.time() * 1000)
        return await self.client.zcount(f"{PREFIX}:slots:{tenant}", now_ms, "+inf")

    # ---- usage ----------------------------------------------------------------------------------

    async def _hot_hours(self, tenant: str, hours: list[str]) -> dict[str, dict[str, float]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(_hour_key(tenant, hour))
            answers = await pipe.execute()
        return {
            hour: {name: float(raw.get(name.encode(), 0.0)) for name in USAGE_FIELDS}
            for hour, raw in zip(hours, answers, strict=True)
            if raw
        }

    async def usage(self, tenant: str, start: datetime, end: datetime) -> dict[str, float]:
        """Totals over whole hours from ``start`` to ``end``: Redis for the hours it still holds, the
        store's day objects (one read per day) for the rest."""
        hours = hours_between(start, end)
        try:
            hot = await self._hot_hours(tenant, hours)
        except RedisError as error:
            raise _unavailable(error) from None
        days: dict[str, dict[str, dict[str, float]]] = {}
        totals = dict.fromkeys(USAGE_FIELDS, 0.0)
        for hour in hours:
            if hour in hot:
                figures = hot[hour]
            else:
                if hour[:10] not in days:
                    days[hour[:10]] = await self._read_day(tenant, hour[:10])
                figures = days[hour[:10]].get(hour, {})
            for name in USAGE_FIELDS:
                totals[name] += figures.get(name, 0.0)
        return totals

    async def _read_day(self, tenant: str, day: str) -> dict[str, dict[str, float]]:
        if self.store is None:
            return {}
        try:
            return parse_day(await self.store.get(day_key(tenant, day)))
        except ObjectNotFoundError:
            return {}

    async def flush(self) -> int:
        """Write every unsettled hour's totals into its day object; forget hours settled and written.
        Returns how many hours were written. Safe to run in every replica at once, and to rerun."""
        if self.store is None:
            return 0
        members = sorted(m.decode() for m in await self.client.smembers(HOURS_KEY))
        by_day: dict[tuple[str, str], list[str]] = {}
        for member in members:
            tenant, hour = member.split("|", 1)
            by_day.setdefault((tenant, hour[:10]), []).append(hour)
        written = 0
        settled_before = hour_of(self.clock() - timedelta(seconds=SETTLED_AFTER_S))
        for (tenant, day), hours in by_day.items():
            hot = await self._hot_hours(tenant, hours)
            await self._write_day(tenant, day, hot)
            written += len(hot)
            done = [hour for hour in hours if hour < settled_before]
            if done:
                async with self.client.pipeline(transaction=True) as pipe:
                    for hour in done:
                        pipe.delete(_hour_key(tenant, hour))
                        pipe.srem(HOURS_KEY, f"{tenant}|{hour}")
                    await pipe.execute()
        return written

    async def _write_day(self, tenant: str, day: str, hot: dict[str, dict[str, float]]) -> None:
        """Set these hours' absolute totals in the day object (a conditional write: another flusher's
        hours of the same day are never overwritten with an older copy)."""
        key = day_key(tenant, day)
        for _ in range(FLUSH_RETRIES):
            try:
                raw, version = await self.store.get_versioned(key)
                hours = parse_day(raw)
            except ObjectNotFoundError:
                hours, version = {}, None
            hours.update(hot)
            data = json.dumps({"hours": hours}, sort_keys=True).encode()
            try:
                await self.store.put_if(key, data, "application/json", version=version)
                return
            except ConcurrentWriteError:
                continue
        raise ConcurrentWriteError(f"usage object {key} kept changing; the next flush tries again")


def _unavailable(error: Exception) -> OverloadedError:
    return OverloadedError(
        "the limits service is unavailable; retry shortly", details=f"redis: {type(error).__name__}"
    )
