"""Retention enforced: a tenant's outputs, sources and job records older than its ``retention_days``
are deleted, in bounded batches, from S3 or the local store alike.

Both S3 lifecycle rules and a sweeper: on S3 each sweep sets one lifecycle rule per tenant prefix
(the test server, SeaweedFS, accepts and returns them), but whether and when a server enforces
lifecycle is its business, and retention is a promise to the tenant; the sweeper is the enforcement
every store gets (the local one too), tested against the real S3 server. The key layout makes it
cheap to decide: outputs and sources live under
``{tenant}/{yyyy}/{mm}/{dd}/...`` and job records under ``{tenant}/jobs/{job id}.json`` with
time-ordered ids, so an object's age is read from its key, never from its contents.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from serve.storage.objects import ObjectStore, job_id_time
from serve.tenancy.tenants import Tenant

logger = logging.getLogger(__name__)

_DATED = re.compile(r"^[^/]+/(\d{4})/(\d{2})/(\d{2})/")
_RECORD = re.compile(r"^[^/]+/jobs/([^/]+)\.json$")


def key_time(key: str) -> datetime | None:
    """When the object under ``key`` was made, as its key says (None: the key does not say)."""
    dated = _DATED.match(key)
    if dated:
        try:
            return datetime(*(int(part) for part in dated.groups()), tzinfo=UTC) + timedelta(days=1)
        except ValueError:
            return None
    record = _RECORD.match(key)
    return job_id_time(record.group(1)) if record else None


def expired(made: datetime | None, retention_days: int, now: datetime) -> bool:
    return made is not None and made < now - timedelta(days=retention_days)


@dataclass
class RetentionSweeper:
    store: ObjectStore
    tenants: Callable[[], Iterable[Tenant]]
    batch: int = 1000  # deletions per sweep at most: a backlog drains over several sweeps
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _rules_set: dict[str, int] = field(default_factory=dict, repr=False)  # last lifecycle rules applied

    async def sweep(self) -> int:
        """Delete up to ``batch`` expired objects across tenants; returns how many were deleted. An S3
        store also gets a lifecycle rule per tenant, so the server expires what it can by itself."""
        now, deleted, tenants = self.clock(), 0, list(self.tenants())
        expire_prefixes = getattr(self.store, "expire_prefixes", None)
        rules = {f"{t.name}/": t.retention_days for t in tenants}
        if expire_prefixes is not None and rules and rules != self._rules_set:  # only when they change
            try:
                await expire_prefixes(rules)
                self._rules_set = rules
            except Exception as error:  # a server without lifecycle support: the sweep still enforces
                logger.warning("could not set lifecycle rules: %s", error)
        for tenant in tenants:
            for key in await self.store.list(f"{tenant.name}/"):
                if deleted >= self.batch:
                    return deleted
                if expired(key_time(key), tenant.retention_days, now):
                    await self.store.delete(key)
                    deleted += 1
        if deleted:
            logger.info("retention: deleted %d expired object(s)", deleted)
        return deleted
