"""``POST /v1/image-to-image``: the REST spec (seed 003), JSON in, the full response object out.

Spec ranges and defaults: strength 0.1-1.0 (0.7), steps 30, guidance_scale 7.5, num_images 1-4 (1).
Where the spec is silent we chose, and document here: steps 1-50 (the node spec's bound),
guidance_scale 0-20 (exclusive of 0), seed 0..2^32-1, prompts by the text policy of every API
(``inference.text_policy``: up to 2000 characters, valid Unicode, no control characters). Unknown fields
are refused (a typo like ``stength`` must not silently fall back to a default). Extensions:
``output_format`` (png/jpeg/webp) and a ``warnings`` list in the response.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_serializer, field_validator

from serve.api.calls import to_call
from serve.api.deps import PriorityDep, ServiceDep, SubmissionsDep, TenantDep
from serve.api.errors import Dialect, error_responses
from serve.api.job_views import job_object
from serve.api.styles import STYLES, resolve_style
from serve.api.text_policy import NameText, PromptText
from serve.errors import PlanLimitError
from serve.generation.calls import CompletedCall, GenerationCall
from serve.jobs.records import RequestEcho, fingerprint
from serve.jobs.submission import Durability
from serve.jobs.webhooks import check_webhook_url

router = APIRouter(prefix="/v1", tags=["image-to-image"], responses=error_responses())


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
    usage: dict[str, Any] | None = Field(
        None, description="images, denoising steps, model_seconds and, with plan prices, cost"
    )

    @field_serializer("created_at", "completed_at")
    def _utc(self, value: datetime | None) -> str | None:
        return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def rest_call(body: ImageToImageRequest, tenant: str, priority: str | None = None) -> GenerationCall:
    """The REST request as a call: the style applied to the prompts, this spec's defaults already in
    ``body``. ``guidance_scale`` left out is the model's own (FLUX.1's 3.5), as GET /v1/models says."""
    style = resolve_style(body.style)
    prompt, negative = (
        style.apply(body.prompt, body.negative_prompt) if style else (body.prompt, body.negative_prompt)
    )
    return to_call(body, tenant, body.image, prompt=prompt, negative_prompt=negative, priority=priority)


def to_echo(body: ImageToImageRequest) -> RequestEcho:
    """The request as written (the prompt before its style); the guidance is replaced by the value the
    call ran with once it is known."""
    return RequestEcho(**body.model_dump(include=set(RequestEcho.model_fields)))


def to_response(body: ImageToImageRequest, done: CompletedCall, usage: dict | None) -> ImageToImageResponse:
    return ImageToImageResponse(
        id=done.call.id,
        status="completed",
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=done.model.id,
        strength=body.strength,
        steps=body.steps,
        guidance_scale=done.params.guidance_scale,
        seed=done.params.seed,
        style=body.style,
        created_at=done.call.created_at,
        completed_at=done.completed_at,
        original_image=ImageInfo(**vars(done.source)),
        images=[ImageInfo(**vars(image)) for image in done.images],
        warnings=list(done.warnings),
        usage=usage,
    )


@router.post(
    "/image-to-image",
    response_model=ImageToImageResponse,
    responses={202: {"description": "Accepted for asynchronous processing; poll the Location URL"}},
)
async def image_to_image(
    body: ImageToImageRequest,
    service: ServiceDep,
    tenant: TenantDep,
    submissions: SubmissionsDep,
    priority: PriorityDep,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """Transform an image. Synchronous by default; asynchronous (202 + Location) with a
    ``webhook_url`` or ``Prefer: respond-async``; idempotent with an ``Idempotency-Key``."""
    call = rest_call(body, tenant, priority)
    webhook_url = str(body.webhook_url) if body.webhook_url is not None else None
    if webhook_url is not None:
        check_webhook_url(webhook_url, service.fetch_policy)
    how = Durability(
        respond_async=webhook_url is not None or "respond-async" in (prefer or "").lower(),
        idempotency=(idempotency_key, fingerprint(body.model_dump(mode="json"))) if idempotency_key else None,
        webhook_url=webhook_url,
    )
    submitted = await submissions.submit(call, to_echo(body), how)
    if submitted.done is not None:
        return to_response(body, submitted.done, submitted.record.usage)
    headers = {"Location": f"/v1/image-to-image/{submitted.record.id}"}
    body_out = await job_object(submitted.record, service.store, service.url_expiry_s)
    return JSONResponse(body_out, 200 if submitted.finished else 202, headers)


@router.get("/styles")
async def list_styles(_: TenantDep) -> dict[str, Any]:
    return {"styles": [{"name": s.name, "description": s.description} for s in STYLES.values()]}


#: The REST spec's codes are the package's own: a fetch failure is an invalid_image, a plan limit on
#: num_images an invalid_parameter like any other out-of-range num_images.
DIALECT = Dialect(
    codes={PlanLimitError: "invalid_parameter"},
    schema_codes={"image": "invalid_image"},
)
