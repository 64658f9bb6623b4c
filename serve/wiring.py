"""``wire``: one process's service (store, tenants, limits, generation service) from validated args.

Every process that serves calls (the ingress replicas and the job coordinators) is built by this one
function, so they cannot drift apart. It takes ``AppArgs`` already validated (``serve.app.build_app``
validates once, in the driver; replicas receive the object) and reads only the secrets, which belong
to the process's environment. The Ray-specific parts (model backend, governor client) are passed
in: this module needs no Ray, and tests wire a process with fakes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from inference.images import ImageLimits
from serve.config import AppArgs, Secrets, build_store, configured_tenants
from serve.generation.service import Admission, GenerationService, ModelBackend
from serve.jobs.leases import Leases, LocalLeases, RedisLeases
from serve.jobs.previews import LocalPreviewBoard, PreviewBoard, PreviewFollowers, RedisPreviewBoard
from serve.jobs.records import JobStore
from serve.observability.metrics import TenantMetrics
from serve.outbound.fetch import FetchPolicy
from serve.storage.objects import ObjectStore
from serve.storage.redis import connect
from serve.tenancy.redis_limits import RedisLimits
from serve.tenancy.tenants import TenantCatalog, TenantStore


@dataclass
class Wired:
    """What a serving process shares between its parts. ``limits`` admits and meters calls and
    answers ``/v1/usage``: the Redis limiter, or the client of the one governor replica."""

    store: ObjectStore
    tenants: TenantCatalog
    service: GenerationService
    records: JobStore
    limits: Admission | None
    redis: Redis | None = None  # the process's pool, when the control plane is Redis


def redis_url(args: AppArgs, secrets: Secrets) -> str | None:
    """The Redis address when the control plane is Redis, with a teaching error when it is unset."""
    if args.control_plane.kind != "redis":
        return None
    if secrets.redis_url is None:
        raise ValueError(
            "control_plane.kind is redis: set IMG2IMG_REDIS_URL (redis://:PASSWORD@HOST:6379/0), or use "
            "control_plane.kind local (one governor replica, no Redis)"
        )
    return secrets.redis_url.get_secret_value()


def wire(args: AppArgs, secrets: Secrets, backend: ModelBackend, governor: Admission | None = None) -> Wired:
    """``governor`` is the governor deployment's client, used when the control plane is local."""
    store = build_store(args, secrets)
    url = redis_url(args, secrets)
    pool = connect(url) if url is not None else None
    limits = governor
    if pool is not None:
        limits = RedisLimits(pool, store, slot_ttl_s=args.control_plane.slot_ttl_s, metrics=TenantMetrics())
    tenants = TenantCatalog(configured_tenants(args, secrets), TenantStore(store))
    service = GenerationService(
        registry=args.registry(),
        backend=backend,
        store=store,
        fetch_policy=FetchPolicy(
            allow_networks=args.fetch.allow_networks,
            total_timeout_s=args.fetch.timeout_s,
            allow_plain_http_webhooks=args.webhooks.allow_plain_http,
        ),
        image_limits=ImageLimits(),
        url_expiry_s=args.storage.url_expiry_s,
        max_side=args.max_side,
        admission=limits,
        tenant_lookup=tenants.lookup,
    )
    return Wired(store, tenants, service, JobStore(store), limits, pool)


def leases(args: AppArgs, wired: Wired) -> Leases:
    """Job leases: shared in Redis when coordinators scale out, else this process owns every job."""
    if wired.redis is None:
        return LocalLeases()
    return RedisLeases(wired.redis, args.control_plane.lease_s)


def preview_board(wired: Wired) -> PreviewBoard:
    """Where a coordinator puts running jobs' previews: its memory, and Redis channels when several
    coordinators share the jobs."""
    return LocalPreviewBoard() if wired.redis is None else RedisPreviewBoard(wired.redis)


def preview_followers(wired: Wired, coordinator) -> PreviewFollowers:
    """How an ingress follows a job's previews: the job's Redis channel, or the one coordinator."""
    return PreviewFollowers(coordinator, wired.redis)
