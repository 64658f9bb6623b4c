"""Per-tenant limits and usage, shared by every ingress replica and the job coordinator.

One ``TenantGovernor`` runs in one Serve replica (``GovernorDeployment``), so its token buckets and
in-flight counts hold across ingress replicas without a database. A request is admitted once, when
it is accepted (synchronous or asynchronous), and released when it finishes, carrying its usage:
requests, images, denoising steps and compute seconds (the request's share of each batched step).
Usage is kept in hourly buckets, rolled up one object per tenant and UTC day in the object store
(``_usage/{tenant}/{YYYY-MM-DD}.json``, its hours inside) so it outlives the replica and a usage query
reads at most one object per day it spans (32 for the longest, 31-day range; it was one per hour, 745),
and exported as per-tenant Prometheus counters. Hour files of the earlier layout
(``_usage/{tenant}/{YYYY-MM-DDTHH}.json``) are no longer read.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from serve.errors import RateLimitedError
from serve.storage.objects import ObjectNotFoundError, ObjectStore

logger = logging.getLogger("serve.tenancy.governor")

USAGE_FIELDS = ("requests", "images", "steps", "compute_seconds")
IN_FLIGHT_TTL_S = 3600.0  # a request never released (its caller crashed) stops counting after this


@dataclass(frozen=True)
class Limits:
    images_per_minute: float | None = None
    concurrency: int | None = None


@dataclass
class _Bucket:
    tokens: float
    updated: float


def hour_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H")


def hours_between(start: datetime, end: datetime) -> list[str]:
    """The UTC hours (``YYYY-MM-DDTHH``) from the one holding ``start`` to the one holding ``end``."""
    moment = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours: list[str] = []
    while moment <= end:
        hours.append(hour_of(moment))
        moment += timedelta(hours=1)
    return hours


def parse_day(raw: bytes) -> dict[str, dict[str, float]]:
    """A day object's hours, every figure a number (anything else raises)."""
    hours = json.loads(raw)["hours"]
    if not isinstance(hours, dict):
        raise TypeError("hours is not an object")
    return {
        str(hour): {name: float(totals.get(name, 0.0)) for name in USAGE_FIELDS}
        for hour, totals in hours.items()
    }


def day_key(tenant: str, day: str) -> str:
    return f"_usage/{tenant}/{day}.json"


@dataclass
class TenantGovernor:
    store: ObjectStore | None = None
    clock: callable = time.monotonic
    metrics: object | None = None
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _in_flight: dict[str, dict[str, float]] = field(default_factory=dict)
    #: (tenant, hour) -> usage not yet written to the store
    _unsaved: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    #: (tenant, day) -> {hour: totals}: the day objects this governor wrote (today's and yesterday's)
    _days: dict[tuple[str, str], dict[str, dict[str, float]]] = field(default_factory=dict)

    def admit(self, tenant: str, request_id: str, images: int, limits: Limits) -> None:
        """Count ``request_id`` against the tenant's limits, or raise RateLimitedError."""
        now = self.clock()
        flights = self._in_flight.setdefault(tenant, {})
        for rid, started in list(flights.items()):
            if now - started > IN_FLIGHT_TTL_S:
                del flights[rid]
        if limits.concurrency is not None and len(flights) >= limits.concurrency:
            raise RateLimitedError(
                f"tenant {tenant!r} has {len(flights)} requests in flight (limit {limits.concurrency})",
                retry_after_s=1.0,
            )
        if limits.images_per_minute is not None:
            per_second = limits.images_per_minute / 60.0
            bucket = self._buckets.setdefault(tenant, _Bucket(limits.images_per_minute, now))
            bucket.tokens = min(limits.images_per_minute, bucket.tokens + (now - bucket.updated) * per_second)
            bucket.updated = now
            if bucket.tokens < images:
                wait = (images - bucket.tokens) / per_second
                raise RateLimitedError(
                    f"tenant {tenant!r} is over its rate limit of {limits.images_per_minute:g} images/minute",
                    retry_after_s=wait,
                )
            bucket.tokens -= images
        flights[request_id] = now

    def release(self, tenant: str, request_id: str, usage: dict[str, float] | None = None) -> None:
        """The request finished (or failed): free its slot and add its usage to the current hour."""
        self._in_flight.get(tenant, {}).pop(request_id, None)
        if usage:
            slot = (tenant, hour_of(datetime.now(UTC)))
            totals = self._unsaved.setdefault(slot, dict.fromkeys(USAGE_FIELDS, 0.0))
            for name in USAGE_FIELDS:
                totals[name] += float(usage.get(name, 0.0))
            if self.metrics is not None:
                self.metrics.tenant_usage(tenant, usage)

    async def _read_day(self, tenant: str, day: str) -> dict[str, dict[str, float]]:
        cached = self._days.get((tenant, day))
        if cached is not None:
            return cached
        if self.store is None:
            return {}
        key = day_key(tenant, day)
        try:
            raw = await self.store.get(key)
        except ObjectNotFoundError:
            return {}
        try:
            return parse_day(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            # One damaged object must not make /v1/usage a 500 or stop every later flush of that day:
            # keep its bytes aside for an operator, then count the day from what this process knows.
            aside = f"{key}.damaged-{int(time.time())}"
            logger.error("usage object %s is unreadable (%s); kept as %s", key, type(error).__name__, aside)
            try:
                await self.store.put(aside, raw, "application/octet-stream")
            except Exception:
                logger.exception("could not keep the damaged usage object %s aside", key)
            return {}

    async def flush(self) -> None:
        """Add the usage recorded since the last flush to each (tenant, day) object it belongs to."""
        if self.store is None:
            return
        for tenant, day in sorted({(tenant, hour[:10]) for tenant, hour in self._unsaved}):
            hours = {hour: dict(totals) for hour, totals in (await self._read_day(tenant, day)).items()}
            taken = {
                h: self._unsaved.pop((t, h)) for t, h in list(self._unsaved) if t == tenant and h[:10] == day
            }
            for hour, delta in taken.items():
                totals = hours.setdefault(hour, dict.fromkeys(USAGE_FIELDS, 0.0))
                for name in USAGE_FIELDS:
                    totals[name] += delta[name]
            try:
                data = json.dumps({"hours": hours}, sort_keys=True).encode()
                await self.store.put(day_key(tenant, day), data, "application/json")
            except BaseException:  # not written: keep the usage for the next flush
                for hour, delta in taken.items():
                    totals = self._unsaved.setdefault((tenant, hour), dict.fromkeys(USAGE_FIELDS, 0.0))
                    for name in USAGE_FIELDS:
                        totals[name] += delta[name]
                raise
            self._days[(tenant, day)] = hours
        oldest = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
        for key in [key for key in self._days if key[1] < oldest]:
            del self._days[key]

    async def usage(self, tenant: str, start: datetime, end: datetime) -> dict[str, float]:
        """The tenant's totals over whole hours from ``start`` to ``end``: one store read per UTC day
        spanned (none for days this governor wrote), plus what is not flushed yet."""
        totals = dict.fromkeys(USAGE_FIELDS, 0.0)
        hours = hours_between(start, end)
        days = {day: await self._read_day(tenant, day) for day in sorted({hour[:10] for hour in hours})}
        for hour in hours:
            for bucket in (days[hour[:10]].get(hour), self._unsaved.get((tenant, hour))):
                for name in USAGE_FIELDS:
                    totals[name] += (bucket or {}).get(name, 0.0)
        return totals

    def in_flight(self, tenant: str) -> int:
        return len(self._in_flight.get(tenant, {}))


class LocalAdmission:
    """The ``Admission`` protocol over an in-process governor (unit tests, single-process tools)."""

    def __init__(self, governor: TenantGovernor) -> None:
        self.governor = governor

    async def admit(self, tenant: str, request_id: str, images: int, limits: Limits) -> None:
        self.governor.admit(tenant, request_id, images, limits)

    async def release(self, tenant: str, request_id: str, usage: dict[str, float] | None) -> None:
        self.governor.release(tenant, request_id, usage)

    async def usage(self, tenant: str, start: datetime, end: datetime) -> dict[str, float]:
        return await self.governor.usage(tenant, start, end)
