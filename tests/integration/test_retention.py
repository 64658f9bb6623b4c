"""Retention against the real S3 server (SeaweedFS): a tenant's outputs, sources and job records
older than its ``retention_days`` are deleted in bounded batches; younger ones and other tenants'
(with longer retention) stay; an expired job id then answers 410."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from serve.jobs.retention import RetentionSweeper
from serve.storage.objects import S3ObjectStore, new_job_id, object_key
from serve.tenancy.tenants import Tenant

NOW = datetime.now(UTC)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def _seed(store) -> dict[str, list[str]]:
    """Objects of two tenants, 40 and 5 days old: outputs, a stored source and a job record each."""
    keys: dict[str, list[str]] = {"old": [], "young": [], "kept": []}
    for tenant, bucket_old in (("acme", "old"), ("beta", "kept")):
        for age, group in ((40, bucket_old), (5, "young")):
            made = NOW - timedelta(days=age)
            job = new_job_id(_ms(made))
            for key in (
                object_key(tenant, job, 0, "png", now=made),
                object_key(tenant, job, "source", "jpg", now=made),
                f"{tenant}/jobs/{job}.json",
            ):
                await store.put(key, b"x", "application/octet-stream")
                keys[group].append(key)
    await store.put("acme/idempotency/k.json", b"{}", "application/json")  # no age in its key: kept
    keys["kept"].append("acme/idempotency/k.json")
    return keys


def test_expired_objects_are_deleted_in_bounded_batches_on_real_s3(s3_server):
    store = S3ObjectStore(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, "retention", secure=False
    )
    tenants = [Tenant(name="acme", retention_days=30), Tenant(name="beta", retention_days=365)]
    sweeper = RetentionSweeper(store, lambda: tenants, batch=2)

    async def scenario():
        await store.ensure_bucket()
        keys = await _seed(store)
        rounds = []
        while (deleted := await sweeper.sweep()) > 0:
            rounds.append(deleted)
        return keys, rounds, set(await store.list(""))

    keys, rounds, left = asyncio.run(scenario())
    assert rounds == [2, 1]  # three expired objects of acme, at most two per sweep
    assert not set(keys["old"]) & left
    assert set(keys["young"]) | set(keys["kept"]) <= left


def test_each_tenant_gets_a_lifecycle_rule_on_real_s3(s3_server):
    store = S3ObjectStore(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, "lifecycle", secure=False
    )
    tenants = [Tenant(name="acme", retention_days=30), Tenant(name="beta", retention_days=365)]

    async def scenario():
        await store.ensure_bucket()
        await RetentionSweeper(store, lambda: tenants).sweep()

    asyncio.run(scenario())
    rules = s3_server.client().get_bucket_lifecycle("lifecycle").rules
    assert {(r.rule_filter.prefix, r.expiration.days) for r in rules} == {("acme/", 30), ("beta/", 365)}
