"""The process's one Redis connection pool (``control_plane.kind: redis``), shared by the limiter
(``serve.tenancy.redis_limits``) and the job leases (``serve.jobs.leases``).

Short timeouts on purpose: a limiter that waits for an unreachable Redis holds the request it should
refuse; two seconds, then the caller answers 503 with Retry-After and the pool reconnects by itself.
"""

from __future__ import annotations

import redis.asyncio as redis


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10)
