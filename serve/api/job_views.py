"""The REST spec's response object, built from a job record in any state (queued ... canceled).

URLs are signed at read time from stored object keys, so an old job still returns working links.
Beyond the spec's fields: ``progress`` (denoising steps done/total), ``error`` for failed jobs,
``webhook`` delivery attempts, and ``warnings``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from serve.generation.service import CompletedJob, PreparedJob
from serve.jobs.records import JobRecord, JobState, StoredOutput, WebhookState
from serve.jobs.runner import job_fields
from serve.storage.objects import ObjectStore


def _utc(value) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


async def _image(output: StoredOutput, store: ObjectStore, expiry_s: int) -> dict[str, Any]:
    url = output.url if output.key is None else await store.url(output.key, expiry_s)
    return {"url": url, "width": output.width, "height": output.height}


async def job_object(record: JobRecord, store: ObjectStore, expiry_s: int) -> dict[str, Any]:
    display = record.display
    body: dict[str, Any] = {
        "id": record.id,
        "status": record.status.value,
        "prompt": display["prompt"],
        "negative_prompt": display.get("negative_prompt"),
        "model": record.model,
        "strength": display["strength"],
        "steps": display["steps"],
        "guidance_scale": display["guidance_scale"],
        "seed": record.seed,
        "style": display.get("style"),
        "created_at": _utc(record.created_at),
        "completed_at": _utc(record.completed_at),
        "original_image": await _image(record.source, store, expiry_s),
        "images": [await _image(image, store, expiry_s) for image in record.images],
        "progress": {
            "steps_done": record.steps_done,
            "steps_total": record.steps_total,
            "fraction": round(record.steps_done / record.steps_total, 4) if record.steps_total else 0.0,
        },
        "warnings": record.warnings,
    }
    if record.error is not None:
        body["error"] = record.error
    if record.webhook is not None:
        body["webhook"] = record.webhook.model_dump()
    return body


def source_output(prepared: PreparedJob) -> StoredOutput:
    image, source = prepared.job.image.strip(), prepared.source
    if image.lower().startswith(("http://", "https://")):
        return StoredOutput(url=image, width=source.width, height=source.height)
    return StoredOutput(key=prepared.source_key, width=source.width, height=source.height)


def new_record(prepared: PreparedJob, display: dict[str, Any], webhook_url: str | None) -> JobRecord:
    """A queued record for a durable job; ``display`` is the request as the caller wrote it."""
    job, now = prepared.job, datetime.now(UTC)
    return JobRecord(
        id=job.job_id,
        tenant=job.tenant,
        created_at=job.created_at,
        updated_at=now,
        job=job_fields(job),
        display=display,
        model=prepared.model.id,
        seed=job.seed,
        source=source_output(prepared),
        source_key=prepared.source_key,
        webhook=WebhookState(url=webhook_url) if webhook_url else None,
    )


def completed_record(done: CompletedJob, display: dict[str, Any], source_key: str | None) -> JobRecord:
    """The record of a job that ran synchronously, so GET /v1/image-to-image/{id} finds it too."""
    job = done.job
    source = done.source
    return JobRecord(
        id=job.job_id,
        tenant=job.tenant,
        status=JobState.COMPLETED,
        created_at=job.created_at,
        updated_at=done.completed_at,
        started_at=job.created_at,
        completed_at=done.completed_at,
        job=job_fields(job),
        display=display,
        model=done.model.id,
        seed=done.seed,
        source=StoredOutput(
            key=source.key, url=None if source.key else source.url, width=source.width, height=source.height
        ),
        source_key=source_key or source.key or "",
        images=[StoredOutput(key=i.key, width=i.width, height=i.height) for i in done.images],
        warnings=list(done.warnings),
    )
