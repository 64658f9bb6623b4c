"""Who runs a durable job, and who owns an Idempotency-Key: leases with fencing tokens.

With one coordinator (the embedded default) ``LocalLeases`` grants every claim: the process is the
only owner. With several (``control_plane.kind: redis``) ``RedisLeases`` makes each job's runner the
holder of a Redis lease (``SET NX PX``), renewed while it runs. A coordinator that dies stops
renewing; its leases expire and another replica's scan claims the job within the lease time.

Every claim also takes the next fencing token of that job (``INCR``). Records are written only with
a token at least as new as the stored one (``JobStore.save_fenced``), so an owner that stalled past
its lease and wakes up cannot overwrite the newer owner's work: its first write fails and it stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from typing import Protocol

import redis.asyncio as redis

from serve.storage.redis import connect

PREFIX = "img2img"
IDEMPOTENCY_TTL_S = 7 * 24 * 3600  # the store keeps the durable binding; Redis only arbitrates races


class Leases(Protocol):
    #: True when other processes may run jobs too: then every scan looks for orphaned jobs.
    shared: bool

    async def claim(self, job_id: str) -> int | None:
        """A fencing token if this process now holds the job's lease, else None (another holds it)."""
        ...

    async def renew(self, job_id: str, token: int) -> bool:
        """Extend the lease; False when it was lost (expired and taken): stop working on the job."""
        ...

    async def release(self, job_id: str, token: int) -> None: ...

    async def above(self, job_id: str, token: int, floor: int) -> int | None:
        """A new token above ``floor`` for the lease held with ``token`` (the stored record carries a
        token the lease store no longer knows: Redis lost its data, or a coordinator restarted), or
        None when the lease is no longer ours."""
        ...

    async def bind_key(self, scope: str, key: str, fingerprint: str, job_id: str) -> tuple[str, str]:
        """Bind an Idempotency-Key to (fingerprint, job id) if it is free; the binding that won."""
        ...


class LocalLeases:
    """One coordinator process owns every job; tokens still count up, as a restart takes a job over."""

    shared = False

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = asyncio.Lock()

    async def claim(self, job_id: str) -> int | None:
        self._tokens[job_id] = self._tokens.get(job_id, 0) + 1
        return self._tokens[job_id]

    async def renew(self, job_id: str, token: int) -> bool:
        return True

    async def release(self, job_id: str, token: int) -> None:
        return None

    async def above(self, job_id: str, token: int, floor: int) -> int | None:
        self._tokens[job_id] = max(self._tokens.get(job_id, 0), floor + 1)
        return self._tokens[job_id]

    async def bind_key(self, scope: str, key: str, fingerprint: str, job_id: str) -> tuple[str, str]:
        async with self._lock:
            return self._keys.setdefault((scope, key), (fingerprint, job_id))


#: KEYS: lease, fence. ARGV: owner, ttl ms. Returns the new fencing token, or 0 when the lease is held.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
  return token
end
return 0
"""
#: KEYS: lease. ARGV: holder ("owner:token"), ttl ms. 1 when renewed, 0 when the lease is not ours.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
#: KEYS: lease, fence. ARGV: owner, held token, floor, ttl ms. The new token, or 0 if not our lease.
ABOVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ':' .. ARGV[2] then return 0 end
local token = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[3])) + 1
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[4])
return token
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeases:
    shared = True

    def __init__(self, client: redis.Redis, lease_s: float, owner: str | None = None) -> None:
        self.client, self.ttl_ms = client, int(lease_s * 1000)
        # host:pid:random: an operator (or a test) can tell which process holds a job
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._above = client.register_script(ABOVE)

    @classmethod
    def from_url(cls, url: str, lease_s: float, owner: str | None = None) -> RedisLeases:
        return cls(connect(url), lease_s, owner)

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        return [f"{PREFIX}:lease:{job_id}", f"{PREFIX}:fence:{job_id}"]

    async def claim(self, job_id: str) -> int | None:
        token = int(await self._claim(keys=self._keys(job_id), args=[self.owner, self.ttl_ms]))
        return token or None

    async def renew(self, job_id: str, token: int) -> bool:
        holder = f"{self.owner}:{token}"
        return bool(await self._renew(keys=self._keys(job_id)[:1], args=[holder, self.ttl_ms]))

    async def release(self, job_id: str, token: int) -> None:
        await self._release(keys=self._keys(job_id)[:1], args=[f"{self.owner}:{token}"])

    async def above(self, job_id: str, token: int, floor: int) -> int | None:
        raised = await self._above(keys=self._keys(job_id), args=[self.owner, token, floor, self.ttl_ms])
        return int(raised) or None

    async def holder(self, job_id: str) -> str | None:
        """``owner:token`` of the lease, if held (tests, operators)."""
        value = await self.client.get(self._keys(job_id)[0])
        return value.decode() if value is not None else None

    async def bind_key(self, scope: str, key: str, fingerprint: str, job_id: str) -> tuple[str, str]:
        name = f"{PREFIX}:idempotency:{scope}:{key}"
        mine = json.dumps([fingerprint, job_id])
        if await self.client.set(name, mine, nx=True, ex=IDEMPOTENCY_TTL_S):
            return fingerprint, job_id
        bound = await self.client.get(name)
        if bound is None:  # expired between the two calls: take it
            await self.client.set(name, mine, ex=IDEMPOTENCY_TTL_S)
            return fingerprint, job_id
        fingerprint_bound, job_bound = json.loads(bound)
        return fingerprint_bound, job_bound
