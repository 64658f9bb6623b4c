"""The REST spec's response object, built from a job record in any state (queued ... canceled).

URLs are signed at read time from stored object keys, so an old job still returns working links.
Beyond the spec's fields: ``progress`` (denoising steps done/total), ``error`` for failed jobs,
``webhook`` delivery attempts, and ``warnings``. Webhooks deliver this same object: the job
coordinator hands ``job_object`` to the runner (``serve.jobs.runner.RenderJob``).
"""

from __future__ import annotations

from typing import Any

from serve.jobs.records import JobRecord, StoredOutput
from serve.storage.objects import ObjectStore


def _utc(value) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


async def _image(output: StoredOutput, store: ObjectStore, expiry_s: int) -> dict[str, Any]:
    url = output.url if output.key is None else await store.url(output.key, expiry_s)
    return {"url": url, "width": output.width, "height": output.height}


async def job_object(record: JobRecord, store: ObjectStore, expiry_s: int) -> dict[str, Any]:
    echo = record.echo
    body: dict[str, Any] = {
        "id": record.id,
        "status": record.status.value,
        "prompt": echo.prompt,
        "negative_prompt": echo.negative_prompt,
        "model": record.model,
        "strength": echo.strength,
        "steps": echo.steps,
        "guidance_scale": echo.guidance_scale,
        "seed": record.seed,
        "style": echo.style,
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
    if not record.status.terminal:
        body["queue_position"] = record.queue_position if record.status.value == "queued" else None
        body["eta_s"] = round(record.eta_s, 2) if record.eta_s is not None else None
    if record.usage is not None:
        body["usage"] = record.usage
    if record.error is not None:
        body["error"] = record.error.public()
    if record.webhook is not None:
        body["webhook"] = record.webhook.model_dump()
    return body


def job_renderer(store: ObjectStore, expiry_s: int):
    """``job_object`` bound to a store: what the job runner delivers to webhooks."""

    async def render(record: JobRecord) -> dict[str, Any]:
        return await job_object(record, store, expiry_s)

    return render
