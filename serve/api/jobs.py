"""Job routes of the REST API: read, cancel and follow a job by id (``/v1/image-to-image/{id}``).

Lookups are scoped to the caller's tenant, so another tenant's job id is a 404, the same answer as
an id that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from inference.errors import InferenceError
from serve.api.deps import CoordinatorDep, JobStoreDep, PreviewsDep, ServiceDep, TenantDep
from serve.api.errors import ApiError, error_responses
from serve.api.job_views import job_object
from serve.errors import ServingError, public_fields
from serve.jobs.records import JobState
from serve.jobs.retention import expired
from serve.storage.objects import job_id_time

logger = logging.getLogger("serve.jobs.records")

router = APIRouter(prefix="/v1/image-to-image", tags=["jobs"], responses=error_responses())

#: Event streams poll the job's record: every EVENTS_POLL_S at first, then less often while nothing
#: changes (x EVENTS_BACKOFF up to EVENTS_POLL_MAX_S; back to EVENTS_POLL_S after a change), for at
#: most EVENTS_MAX_S. A stuck job costs ~190 record reads over 15 minutes instead of 1800.
EVENTS_POLL_S = 0.5
EVENTS_POLL_MAX_S = 5.0
EVENTS_BACKOFF = 2.0
EVENTS_MAX_S = 900.0
#: Open event streams per tenant on one ingress replica; one more is a 429 in the REST envelope.
EVENTS_PER_TENANT = 4


def poll_delays(first: float, backoff: float, most: float):
    """The waits between polls of a record that does not change: first, first*backoff, ... up to most."""
    delay = first
    while True:
        yield delay
        delay = min(most, delay * backoff)


class StreamSlots:
    """Counts open event streams per tenant (one instance per app: an ingress replica)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def take(self, tenant: str, limit: int) -> None:
        if self.open.get(tenant, 0) >= limit:
            raise ApiError(
                429,
                "rate_limited",
                f"at most {limit} event streams may be open at once for this tenant; close one, "
                "or poll GET /v1/image-to-image/{id}",
                param="id",
                headers={"Retry-After": "5"},
            )
        self.open[tenant] = self.open.get(tenant, 0) + 1

    def give_back(self, tenant: str) -> None:
        left = self.open.get(tenant, 0) - 1
        if left > 0:
            self.open[tenant] = left
        else:
            self.open.pop(tenant, None)


def _slots(app) -> StreamSlots:
    slots = getattr(app.state, "event_streams", None)
    if slots is None:
        slots = app.state.event_streams = StreamSlots()
    return slots


class _SlotStream(StreamingResponse):
    """A streaming response that gives its tenant's slot back however it ends (finished, client gone)."""

    def __init__(self, content, give_back, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._give_back = give_back

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._give_back()


JOB_ID = r"^img_[0-9A-Za-z]{22}$"


@router.get("")
async def list_jobs(
    service: ServiceDep,
    tenant: TenantDep,
    job_store: JobStoreDep,
    status: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(pattern=JOB_ID, description="next_after of the previous page")] = None,
) -> dict:
    """The caller's jobs, newest first, ``limit`` at a time; pass a page's ``next_after`` as ``after``
    for the next (older) page. Synchronous calls are listed too (their records are kept)."""
    records, more = await job_store.newest(tenant, limit, before=after, status=status)
    data = [await job_object(record, service.store, service.url_expiry_s) for record in records]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "next_after": records[-1].id if more else None,
    }


async def _load(request: Request, job_store, tenant: str, job_id: str):
    """The tenant's record; 410 for a job its retention deleted (the id says when it was made),
    404 for one that never was (or is another tenant's: the same answer)."""
    record = await job_store.load(tenant, job_id)
    if record is not None:
        return record
    owner = request.app.state.tenants.lookup(tenant)
    if owner is not None and expired(job_id_time(job_id), owner.retention_days, datetime.now(UTC)):
        raise ApiError(
            410,
            "expired",
            f"job {job_id!r} is older than your {owner.retention_days}-day retention; "
            "its record and images were deleted",
            param="id",
        )
    raise ApiError(404, "not_found", f"no job {job_id!r}", param="id")


@router.get("/{job_id}")
async def get_job(
    job_id: str, request: Request, service: ServiceDep, tenant: TenantDep, job_store: JobStoreDep
) -> dict:
    """The job object in any state: queued, processing (with progress), completed, failed, canceled."""
    return await job_object(
        await _load(request, job_store, tenant, job_id), service.store, service.url_expiry_s
    )


@router.delete("/{job_id}")
async def cancel_job(
    job_id: str,
    request: Request,
    service: ServiceDep,
    tenant: TenantDep,
    jobs: CoordinatorDep,
    job_store: JobStoreDep,
):
    """Cancel: a queued job never runs; a running one leaves the engine at its next denoising step."""
    await _load(request, job_store, tenant, job_id)
    record = await jobs.cancel(tenant, job_id)
    return await job_object(record, service.store, service.url_expiry_s)


async def _new_previews(follower, job_id: str) -> list[dict]:
    """Previews are best effort: a coordinator or Redis that does not answer costs the stream nothing."""
    try:
        return await follower.take()
    except Exception as error:
        logger.debug("previews of job %s unavailable: %s", job_id, error)
        return []


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "One event per job state change; preview events while it runs",
        }
    },
)
async def job_events(
    job_id: str,
    request: Request,
    service: ServiceDep,
    tenant: TenantDep,
    job_store: JobStoreDep,
    previews: PreviewsDep,
):
    """Server-sent events: the job object whenever its state or progress changes, until it is final;
    while it runs, a ``preview`` event with a small picture of each image every few steps.

    At most ``EVENTS_PER_TENANT`` streams per tenant at once (429 beyond); the record is polled less
    often while it does not change. Previews are best effort and never stored."""
    await _load(request, job_store, tenant, job_id)
    slots = _slots(request.app)
    slots.take(tenant, getattr(request.app.state, "event_streams_per_tenant", EVENTS_PER_TENANT))

    async def stream():
        follower = previews.follow(tenant, job_id)
        try:
            await follower.open()
        except Exception as error:  # best effort, as every preview is
            logger.debug("previews of job %s unavailable: %s", job_id, error)
        try:
            async for event in job_stream(follower):
                yield event
        finally:
            await follower.close()

    async def job_stream(follower):
        last, deadline = None, time.monotonic() + EVENTS_MAX_S
        delays = poll_delays(EVENTS_POLL_S, EVENTS_BACKOFF, EVENTS_POLL_MAX_S)
        while time.monotonic() < deadline:
            try:
                record = await job_store.load(tenant, job_id)
            except (InferenceError, ServingError) as error:  # storage down: say so generically, log why
                logger.warning("event stream of job %s stopped: %s", job_id, error)
                body = {"error": public_fields(error)}
                yield f"event: error\ndata: {json.dumps(body)}\n\n"
                return
            if record is None:
                return
            seen = (record.status, record.steps_done)
            if seen != last:
                last = seen
                delays = poll_delays(EVENTS_POLL_S, EVENTS_BACKOFF, EVENTS_POLL_MAX_S)
                body = await job_object(record, service.store, service.url_expiry_s)
                yield f"event: {record.status.value}\ndata: {json.dumps(body)}\n\n"
            if record.status.terminal:
                return
            if record.status is JobState.PROCESSING:
                for frame in await _new_previews(follower, job_id):
                    yield f"event: preview\ndata: {json.dumps(frame)}\n\n"
            await asyncio.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))

    try:
        return _SlotStream(
            stream(),
            lambda: slots.give_back(tenant),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    except BaseException:
        slots.give_back(tenant)
        raise
