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
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from serve.errors import Failure, IdempotencyConflictError, public_fields, status_for
from serve.generation.calls import CompletedCall, GenerationCall, PreparedCall, StoredImage
from serve.storage.objects import ConcurrentWriteError, ObjectNotFoundError, ObjectStore


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


class RequestEcho(BaseModel):
    """The request as the caller wrote it, for the job object: the prompt before a style was applied,
    the style's name, and the values the call ran with."""

    prompt: str
    negative_prompt: str | None = None
    strength: float
    steps: int
    guidance_scale: float
    style: str | None = None


class JobError(BaseModel):
    """Why a job failed, safe to show its owner (a server fault's text is a stable sentence), and the
    HTTP status the failure had, for a caller that waited for the job (an idempotent synchronous call)."""

    code: str
    message: str
    details: str | None = None
    status: int = 500

    @classmethod
    def of(cls, error: Failure) -> JobError:
        return cls(**public_fields(error), status=status_for(error))

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"status"})


class JobRecord(BaseModel):
    """Everything needed to answer GET in any state, and to resume the job in another process."""

    id: str
    tenant: str
    status: JobState = JobState.QUEUED
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    call: GenerationCall  # with every choice resolved; an inline image payload is stored, not kept here
    echo: RequestEcho
    model: str
    seed: int
    source: StoredOutput
    source_key: str
    steps_done: int = 0
    steps_total: int = 0
    queue_position: int | None = None  # requests ahead in the model's engine queue while queued
    eta_s: float | None = None  # the engine's estimate, from measured step times
    images: list[StoredOutput] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: JobError | None = None
    webhook: WebhookState | None = None
    run_attempts: int = 0
    cancel_requested: bool = False
    lease_token: int = 0  # the fencing token of the runner that last wrote it (serve.jobs.leases)
    usage: dict[str, Any] | None = None  # CompletedCall.usage_report: images, steps, model-seconds, cost

    def touch(self) -> JobRecord:
        self.updated_at = datetime.now(UTC)
        return self


#: What a record keeps of an inline (data URL) source: the bytes are in the store under ``source_key``.
STORED_SOURCE = "data:stored"


def _recordable(call: GenerationCall) -> GenerationCall:
    return call if call.source_is_url else replace(call, image=STORED_SOURCE)


def _output(image: StoredImage) -> StoredOutput:
    """Stored outputs by key (URLs are signed on read); an echoed external URL as itself."""
    if image.key is None:
        return StoredOutput(url=image.url, width=image.width, height=image.height)
    return StoredOutput(key=image.key, width=image.width, height=image.height)


def new_record(prepared: PreparedCall, echo: RequestEcho, webhook_url: str | None) -> JobRecord:
    """A queued record for a durable job (its source already stored)."""
    call, now = prepared.call, datetime.now(UTC)
    source = prepared.source
    return JobRecord(
        id=call.id,
        tenant=call.tenant,
        created_at=call.created_at,
        updated_at=now,
        call=_recordable(call),
        echo=echo,
        model=prepared.model.id,
        seed=call.params.seed,
        source=(
            StoredOutput(url=call.image.strip(), width=source.width, height=source.height)
            if call.source_is_url
            else StoredOutput(key=prepared.source_key, width=source.width, height=source.height)
        ),
        source_key=prepared.source_key,
        webhook=WebhookState(url=webhook_url) if webhook_url else None,
    )


def completed_record(
    done: CompletedCall, echo: RequestEcho, usage: dict[str, Any] | None = None
) -> JobRecord:
    """The record of a call that ran synchronously, so GET /v1/image-to-image/{id} finds it too."""
    call = done.call
    return JobRecord(
        id=call.id,
        tenant=call.tenant,
        status=JobState.COMPLETED,
        created_at=call.created_at,
        updated_at=done.completed_at,
        started_at=call.created_at,
        completed_at=done.completed_at,
        call=_recordable(call),
        echo=echo,
        model=done.model.id,
        seed=call.params.seed,
        source=_output(done.source),
        source_key=done.source.key or "",
        images=[_output(image) for image in done.images],
        warnings=list(done.warnings),
        usage=usage,
    )


def fingerprint(body: dict[str, Any]) -> str:
    """A stable hash of a request body: the same logical request gives the same fingerprint."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class StaleLeaseError(Exception):
    """A newer runner holds this job (a higher fencing token is stored): this one must stop, unheard."""


#: A conditional write lost to another writer this often in a row: give up (the caller retries later).
FENCED_WRITE_ATTEMPTS = 10


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
        """Write a record no runner holds yet (a new job, a synchronous call's result)."""
        data = record.touch().model_dump_json().encode()
        await self.store.put(self.record_key(record.tenant, record.id), data, "application/json")
        await self._mark(record)

    async def save_fenced(self, record: JobRecord) -> None:
        """Write a running job's record only if no newer runner has written it (its stored
        ``lease_token`` is not higher): ``StaleLeaseError`` otherwise. A cancellation another process
        requested meanwhile is kept (``record.cancel_requested`` becomes True: the runner sees it)."""
        key = self.record_key(record.tenant, record.id)
        for _ in range(FENCED_WRITE_ATTEMPTS):
            try:
                raw, version = await self.store.get_versioned(key)
                stored = JobRecord.model_validate_json(raw)
            except ObjectNotFoundError:
                stored, version = None, None
            if stored is not None:
                if stored.lease_token > record.lease_token:
                    raise StaleLeaseError(
                        f"job {record.id}: token {record.lease_token} < stored {stored.lease_token}"
                    )
                record.cancel_requested = record.cancel_requested or stored.cancel_requested
            data = record.touch().model_dump_json().encode()
            try:
                await self.store.put_if(key, data, "application/json", version=version)
            except ConcurrentWriteError:
                continue
            await self._mark(record)
            return
        raise ConcurrentWriteError(f"job {record.id}: the record kept changing under this runner")

    async def request_cancel(self, tenant: str, job_id: str) -> None:
        """Set the record's cancel flag without touching anything its runner writes."""
        key = self.record_key(tenant, job_id)
        for _ in range(FENCED_WRITE_ATTEMPTS):
            raw, version = await self.store.get_versioned(key)
            record = JobRecord.model_validate_json(raw)
            if record.status.terminal or record.cancel_requested:
                return
            record.cancel_requested = True
            try:
                await self.store.put_if(
                    key, record.touch().model_dump_json().encode(), "application/json", version=version
                )
                return
            except ConcurrentWriteError:
                continue
        raise ConcurrentWriteError(f"job {job_id}: the record kept changing; cancel again")

    async def _mark(self, record: JobRecord) -> None:
        """The pending marker follows the record: present while the job is not finished."""
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

    async def newest(
        self, tenant: str, limit: int, before: str | None = None, status: JobState | None = None
    ) -> tuple[list[JobRecord], bool]:
        """The tenant's jobs, newest first (ids are time-ordered), older than job id ``before``, only
        those in ``status`` if given: up to ``limit`` records, and whether more follow. Only the
        tenant's own prefix is listed: another tenant's jobs cannot appear."""
        prefix = f"{tenant}/jobs/"
        ids = [
            key[len(prefix) : -len(".json")] for key in await self.store.list(prefix) if key.endswith(".json")
        ]
        page: list[JobRecord] = []
        for job_id in sorted(ids, reverse=True):
            if before is not None and job_id >= before:
                continue
            record = await self.load(tenant, job_id)
            if record is None or (status is not None and record.status is not status):
                continue
            if len(page) == limit:
                return page, True
            page.append(record)
        return page, False

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
