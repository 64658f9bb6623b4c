"""Durable job records for asynchronous requests, kept in the object store beside their outputs.

Why the object store: it is already the durable, shared dependency of every replica (S3/MinIO in
production), so records survive any ingress restart and are readable from every replica, with no
second database to run. Layout, all under the tenant's prefix (a tenant can only ever name its own):

* ``{tenant}/jobs/{job_id}.json``: the record (state, request, progress, result keys, webhook attempts);
* ``{tenant}/idempotency/{sha256(key)}.json``: an Idempotency-Key → (request fingerprint, job id);
* ``_pending/{tenant}/{job_id}``: a marker while a job is not finished, so a restarted coordinator
  finds unfinished work by listing one small prefix instead of every record.

Output URLs are not stored (they expire): records hold object keys and URLs are signed on read.
"""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from inference.errors import InvalidInputError
from serve.storage.objects import ObjectNotFoundError, ObjectStore


class IdempotencyConflictError(InvalidInputError):
    """The Idempotency-Key was used before with a different request body (HTTP 409)."""

    code = "idempotency_conflict"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELED)


class StoredOutput(BaseModel):
    key: str | None = None
    url: str | None = None  # only for an echoed external source URL
    width: int
    height: int


class WebhookState(BaseModel):
    """Delivery of the job's final state: ``pending`` until one attempt is acknowledged
    (``delivered``) or every attempt failed (``failed``; the attempts say why, and the job itself
    is still completed: a receiver being down never loses the result, which GET still returns)."""

    url: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    delivered: bool = False
    attempts: list[dict[str, Any]] = Field(default_factory=list)


class JobRecord(BaseModel):
    """Everything needed to answer GET in any state, and to resume the job in another process."""

    id: str
    tenant: str
    status: JobState = JobState.QUEUED
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    job: dict[str, Any]  # GenerationJob fields, without the inline image payload
    display: dict[str, Any]  # the request as the caller wrote it (prompt before style, style, ...)
    model: str
    seed: int
    source: StoredOutput
    source_key: str
    steps_done: int = 0
    steps_total: int = 0
    images: list[StoredOutput] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    webhook: WebhookState | None = None
    run_attempts: int = 0
    cancel_requested: bool = False

    def touch(self) -> JobRecord:
        self.updated_at = datetime.now(UTC)
        return self


def fingerprint(body: dict[str, Any]) -> str:
    """A stable hash of a request body: the same logical request gives the same fingerprint."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobStore:
    """Job records, idempotency keys and pending markers in an ``ObjectStore``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def record_key(tenant: str, job_id: str) -> str:
        return f"{tenant}/jobs/{job_id}.json"

    @staticmethod
    def _pending_key(tenant: str, job_id: str) -> str:
        return f"_pending/{tenant}/{job_id}"

    @staticmethod
    def _idempotency_key(tenant: str, key: str) -> str:
        return f"{tenant}/idempotency/{hashlib.sha256(key.encode()).hexdigest()}.json"

    async def save(self, record: JobRecord) -> None:
        data = record.touch().model_dump_json().encode()
        await self.store.put(self.record_key(record.tenant, record.id), data, "application/json")
        if record.status.terminal:
            await self.store.delete(self._pending_key(record.tenant, record.id))
        else:
            await self.store.put(self._pending_key(record.tenant, record.id), b"", "text/plain")

    async def load(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's record, or None (also for another tenant's id: the same answer as missing)."""
        try:
            data = await self.store.get(self.record_key(tenant, job_id))
        except (ObjectNotFoundError, ValueError):
            return None
        return JobRecord.model_validate_json(data)

    async def pending(self) -> list[tuple[str, str]]:
        """(tenant, job id) of every job not finished, oldest key first."""
        keys = await self.store.list("_pending/")
        return [tuple(key.split("/")[1:3]) for key in keys if key.count("/") == 2]

    async def idempotent_job(self, tenant: str, key: str) -> tuple[str, str] | None:
        """(fingerprint, job id) already bound to this Idempotency-Key, if any."""
        try:
            data = json.loads(await self.store.get(self._idempotency_key(tenant, key)))
        except ObjectNotFoundError:
            return None
        return data["fingerprint"], data["job_id"]

    async def replayed_job(self, tenant: str, key: str, body_fingerprint: str) -> str | None:
        """The job id already bound to this Idempotency-Key for the same body, None if the key is new;
        ``IdempotencyConflictError`` if it was used with another body. One small read: the ingress
        asks this before it fetches, decodes, stores or charges anything for the request."""
        bound = await self.idempotent_job(tenant, key)
        if bound is None:
            return None
        if bound[0] != body_fingerprint:
            raise IdempotencyConflictError(
                "this Idempotency-Key was already used with a different request body", param="Idempotency-Key"
            )
        return bound[1]

    async def bind_idempotency(self, tenant: str, key: str, body_fingerprint: str, job_id: str) -> None:
        data = json.dumps({"fingerprint": body_fingerprint, "job_id": job_id}).encode()
        await self.store.put(self._idempotency_key(tenant, key), data, "application/json")
