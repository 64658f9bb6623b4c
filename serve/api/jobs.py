"""Job routes of the REST API: read, cancel and follow a job by id (``/v1/image-to-image/{id}``).

Lookups are scoped to the caller's tenant, so another tenant's job id is a 404, the same answer as
an id that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from serve.api.deps import JobsDep, JobStoreDep, ServiceDep, TenantDep
from serve.api.errors import ApiError, error_responses
from serve.api.job_views import job_object

router = APIRouter(prefix="/v1/image-to-image", tags=["jobs"], responses=error_responses())

EVENTS_POLL_S = 0.5
EVENTS_MAX_S = 900.0


async def _load(job_store, tenant: str, job_id: str):
    record = await job_store.load(tenant, job_id)
    if record is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", param="id")
    return record


@router.get("/{job_id}")
async def get_job(job_id: str, service: ServiceDep, tenant: TenantDep, job_store: JobStoreDep) -> dict:
    """The job object in any state: queued, processing (with progress), completed, failed, canceled."""
    return await job_object(await _load(job_store, tenant, job_id), service.store, service.url_expiry_s)


@router.delete("/{job_id}")
async def cancel_job(
    job_id: str, service: ServiceDep, tenant: TenantDep, jobs: JobsDep, job_store: JobStoreDep
):
    """Cancel: a queued job never runs; a running one leaves the engine at its next denoising step."""
    await _load(job_store, tenant, job_id)
    record = await jobs.cancel(tenant, job_id)
    return await job_object(record, service.store, service.url_expiry_s)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "One event per job state change"}},
)
async def job_events(job_id: str, service: ServiceDep, tenant: TenantDep, job_store: JobStoreDep):
    """Server-sent events: the job object whenever its state or progress changes, until it is final."""
    await _load(job_store, tenant, job_id)

    async def stream():
        last, deadline = None, time.monotonic() + EVENTS_MAX_S
        while time.monotonic() < deadline:
            record = await job_store.load(tenant, job_id)
            seen = (record.status, record.steps_done)
            if seen != last:
                last = seen
                body = await job_object(record, service.store, service.url_expiry_s)
                yield f"event: {record.status.value}\ndata: {json.dumps(body)}\n\n"
            if record.status.terminal:
                return
            await asyncio.sleep(EVENTS_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
