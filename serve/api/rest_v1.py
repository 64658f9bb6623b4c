"""``POST /v1/image-to-image``: the REST spec (seed 003), JSON in, the full response object out.

Spec ranges and defaults: strength 0.1-1.0 (0.7), steps 30, guidance_scale 7.5, num_images 1-4 (1).
Where the spec is silent we chose, and document here: steps 1-50 (the node spec's bound),
guidance_scale 0-20 (exclusive of 0), seed 0..2^32-1, prompts by the text policy of every API
(``inference.text_policy``: up to 2000 characters, valid Unicode, no control characters). Unknown fields
are refused (a typo like ``stength`` must not silently fall back to a default). Extensions:
``output_format`` (png/jpeg/webp) and a ``warnings`` list in the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_serializer, field_validator

from inference.errors import InferenceError
from serve.api.deps import JobsDep, JobStoreDep, ServiceDep, TenantDep, explicit_choices
from serve.api.errors import STATUS_BY_CODE, ApiError, error_responses, validation_summary
from serve.api.job_views import completed_record, job_object, new_record
from serve.api.styles import STYLES, resolve_style
from serve.api.text_policy import NameText, PromptText
from serve.generation.service import CompletedJob, GenerationJob
from serve.jobs.records import JobState, fingerprint
from serve.jobs.webhooks import check_webhook_url

router = APIRouter(prefix="/v1", tags=["image-to-image"], responses=error_responses())

SYNC_WAIT_S = 300.0  # an idempotent synchronous request waits this long, then answers 202


class ImageToImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="Base64 data URL or http(s) URL of the source image")
    prompt: PromptText = Field(min_length=1)
    model: NameText | None = Field(
        None, description="Model id (GET /v1/models); default: the first configured"
    )
    strength: float = Field(0.7, ge=0.1, le=1.0)
    steps: int = Field(30, ge=1, le=50, strict=True)
    guidance_scale: float = Field(7.5, gt=0, le=20)
    negative_prompt: PromptText | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1, strict=True)
    num_images: int = Field(1, ge=1, le=4, strict=True)
    style: NameText | None = Field(None, description="A preset from GET /v1/styles")
    webhook_url: AnyHttpUrl | None = Field(None, description="Called with the job object on completion")
    output_format: Literal["png", "jpeg", "webp"] = "png"

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain text")
        return value


class ImageInfo(BaseModel):
    url: str
    width: int
    height: int


class ImageToImageResponse(BaseModel):
    id: str
    status: Literal["queued", "processing", "completed", "failed", "canceled"]
    prompt: str
    negative_prompt: str | None
    model: str
    strength: float
    steps: int
    guidance_scale: float
    seed: int
    style: str | None
    created_at: datetime
    completed_at: datetime | None
    original_image: ImageInfo
    images: list[ImageInfo]
    warnings: list[str] = []

    @field_serializer("created_at", "completed_at")
    def _utc(self, value: datetime | None) -> str | None:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def to_job(body: ImageToImageRequest, tenant: str) -> GenerationJob:
    style = resolve_style(body.style)
    prompt, negative = (
        style.apply(body.prompt, body.negative_prompt)
        if style
        else (
            body.prompt,
            body.negative_prompt,
        )
    )
    return GenerationJob(
        tenant=tenant,
        image=body.image,
        prompt=prompt,
        negative_prompt=negative,
        model=body.model,
        strength=body.strength,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        num_images=body.num_images,
        seed=body.seed,
        output_format=body.output_format,
        explicitly_set=explicit_choices(body),
    )


def to_response(body: ImageToImageRequest, done: CompletedJob) -> ImageToImageResponse:
    return ImageToImageResponse(
        id=done.job.job_id,
        status="completed",
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=done.model.id,
        strength=body.strength,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=done.seed,
        style=body.style,
        created_at=done.job.created_at,
        completed_at=done.completed_at,
        original_image=ImageInfo(**vars(done.source)),
        images=[ImageInfo(**vars(image)) for image in done.images],
        warnings=list(done.warnings),
    )


DISPLAY_FIELDS = {"prompt", "negative_prompt", "strength", "steps", "guidance_scale", "style"}


@router.post(
    "/image-to-image",
    response_model=ImageToImageResponse,
    responses={202: {"description": "Accepted for asynchronous processing; poll the Location URL"}},
)
async def image_to_image(
    body: ImageToImageRequest,
    service: ServiceDep,
    tenant: TenantDep,
    jobs: JobsDep,
    job_store: JobStoreDep,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """Transform an image. Synchronous by default; asynchronous (202 + Location) with a
    ``webhook_url`` or ``Prefer: respond-async``; idempotent with an ``Idempotency-Key``."""
    job = to_job(body, tenant)
    webhook_url = str(body.webhook_url) if body.webhook_url is not None else None
    if webhook_url is not None:
        check_webhook_url(webhook_url, service.fetch_policy)
    respond_async = webhook_url is not None or "respond-async" in (prefer or "").lower()
    display = body.model_dump(mode="json", include=DISPLAY_FIELDS)
    if not respond_async and idempotency_key is None:
        done = await service.run(job)
        await job_store.save(completed_record(done, display, None))
        return to_response(body, done)

    idempotency = (idempotency_key, fingerprint(body.model_dump(mode="json"))) if idempotency_key else None
    # A replay is recognised before its source is fetched, decoded or stored and before it is charged.
    job_id = await job_store.replayed_job(tenant, *idempotency) if idempotency else None
    if job_id is None:
        prepared = await service.store_source(await service.prepare(job))
        record = new_record(prepared, display, webhook_url)
        try:
            job_id = await jobs.accept(record, idempotency, prepared.source)  # decoded once, here
        except BaseException:
            await service.release(prepared.job, None)
            raise
        if job_id != record.id:  # a concurrent request won the key: undo this one's admission and source
            await service.release(prepared.job, None)
            await service.discard_source(prepared)
    if not respond_async:  # synchronous but idempotent: the coordinator runs it; we wait for the outcome
        record = await jobs.wait(tenant, job_id, SYNC_WAIT_S)
        if record.status is JobState.FAILED:
            error = record.error or {}
            code = error.get("code", "generation_failed")
            raise ApiError(STATUS_BY_CODE.get(code, 500), code, error.get("message", "generation failed"))
    else:
        record = await job_store.load(tenant, job_id)
    status = 200 if record.status is JobState.COMPLETED else 202
    headers = {"Location": f"/v1/image-to-image/{job_id}"}
    return JSONResponse(await job_object(record, service.store, service.url_expiry_s), status, headers)


@router.get("/styles")
async def list_styles(_: TenantDep) -> dict[str, Any]:
    return {"styles": [{"name": s.name, "description": s.description} for s in STYLES.values()]}


class RestDialect:
    """The REST spec's error vocabulary: its codes are the package's own."""

    def rename(self, error: InferenceError) -> str:
        return error.code

    def validation(self, errors: Sequence[dict[str, Any]]) -> ApiError:
        param, message, details = validation_summary(errors)
        code = {"image": "invalid_image", "body": "invalid_request"}.get(param, "invalid_parameter")
        return ApiError(400, code, message, details, param)
