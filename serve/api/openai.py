"""``POST /v1/images/edits``: OpenAI's image-edit API, so the ``openai`` client's ``images.edit`` works.

Multipart/form-data in, ``{"created", "data": [{"url"} | {"b64_json"}]}`` out, errors in OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``. What we accept, and where we differ:

* ``image`` (one file) or ``image[]`` (what the client sends for a list). Exactly one source image:
  more than one is refused with a 400 (param ``image``) rather than silently dropped. The bytes pass
  the same checks as a base64 source (10 MB, JPEG/PNG/WEBP sniffed from the content, pixel limits).
* ``prompt`` (required; the text policy of every API, ``inference.text_policy``: up to 2000
  characters, valid Unicode, no control characters but tab and line breaks), ``model`` (one of
  ``GET /v1/models``, or a client-facing alias from ``openai.model_aliases`` such as ``gpt-image-1``;
  default: the first configured). An unknown name is a 400 ``model_not_found`` listing ours and the
  aliases.
* ``n`` 1-4 (default 1, the REST spec's bound), ``response_format`` ``url`` (default; presigned, they
  expire) or ``b64_json`` (PNG bytes), ``size`` ``WxH`` with each side 1-2048 or ``auto``/absent for
  the source size; sides are rounded to multiples of 8 (``inference.images.output_size``).
* ``mask`` is refused (400, param ``mask``): inpainting is not offered. ``user`` is accepted and ignored.
* ``stream=true`` answers ``text/event-stream`` in OpenAI's event shapes, with up to ``partial_images``
  (0-3) previews of the first image first (``serve.api.openai_stream``); ``output_format``
  png/jpeg/webp (png) applies to every image. Any other field is a 400 ``unknown_parameter`` (as OpenAI does).
* Extensions, e.g. through the client's ``extra_body``: ``strength`` 0.1-1.0 (0.7), ``steps`` 1-50
  (30), ``guidance_scale`` (0, 20] (7.5), ``negative_prompt``, ``seed`` 0..2^32-1. The response has a
  ``warnings`` list only when a parameter was ignored by the model.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from inference.errors import ImageTooLargeError, InvalidInputError, UnknownModelError
from inference.images import MAX_OUTPUT_SIDE
from serve.api.calls import to_call
from serve.api.deps import ModelAliasesDep, PriorityDep, ServiceDep, TenantDep
from serve.api.errors import ApiError, Dialect, error_responses, validation_summary
from serve.api.openai_stream import edit_events
from serve.api.text_policy import NameText, PromptText
from serve.errors import AuthError, PlanLimitError, RateLimitedError
from serve.generation.calls import CompletedCall
from serve.generation.service import GenerationService


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorEnvelope(BaseModel):
    """OpenAI's error body, so the ``openai`` client raises its typed errors from ours."""

    error: OpenAIErrorBody


router = APIRouter(prefix="/v1/images", tags=["openai"], responses=error_responses(OpenAIErrorEnvelope))

_SIZE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")


def parse_size(size: str | None) -> tuple[int, int]:
    """``"WxH"`` → (W, H); ``"auto"`` or absent → (0, 0), the source size."""
    if size is None or size.strip().lower() in ("", "auto"):
        return 0, 0
    match = _SIZE.fullmatch(size)
    width, height = (int(side) for side in match.groups()) if match else (0, 0)
    if not (0 < width <= MAX_OUTPUT_SIDE and 0 < height <= MAX_OUTPUT_SIDE):
        raise PydanticCustomError(
            "invalid_size",
            "size must be 'auto' or 'WxH' with each side 1-{limit} (e.g. '512x512'), got {size}",
            {"limit": MAX_OUTPUT_SIDE, "size": repr(size)},
        )
    return width, height


#: An optional file part, documented as a plain binary string: an optional field is simply left out,
#: and generators (schemathesis, client codegen) only recognise a file part in this spelling.
FILE_PART = WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream"})


def _without_null_branches(schema: dict[str, Any]) -> None:
    """A multipart field is either sent or left out; it cannot be JSON null. Document optional
    fields by their real type only, or generated clients send the text 'null'."""
    for name, prop in schema.get("properties", {}).items():
        branches = [b for b in prop.get("anyOf", ()) if b != {"type": "null"}]
        if "anyOf" in prop and len(branches) == 1:
            rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            schema["properties"][name] = {**branches[0], **rest}


class ImageEditForm(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_without_null_branches)

    image: Annotated[UploadFile | None, FILE_PART] = Field(
        None, description="The source image (PNG, JPEG or WEBP, at most 10 MB)"
    )
    image_list: list[UploadFile] = Field(
        default_factory=list, alias="image[]", description="Alternative to image: exactly one file"
    )
    prompt: PromptText = Field(min_length=1)
    model: NameText | None = Field(
        None, description="Model id (GET /v1/models); default: the first configured"
    )
    n: int = Field(1, ge=1, le=4)
    size: str | None = Field(None, description="'WxH' (sides 1-2048, rounded to multiples of 8) or 'auto'")
    response_format: Literal["url", "b64_json"] = "url"
    mask: UploadFile | str | None = Field(None, description="Not supported: a request with a mask is refused")
    stream: bool = Field(False, description="Server-sent events: partial images, then each image")
    partial_images: int = Field(0, ge=0, le=3, description="Previews streamed before the image (stream=true)")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = Field(None, description="Accepted and ignored")
    strength: float = Field(0.7, ge=0.1, le=1.0)
    steps: int = Field(30, ge=1, le=50)
    guidance_scale: float = Field(7.5, gt=0, le=20)
    negative_prompt: PromptText | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank_prompt", "prompt must contain text")
        return value

    @field_validator("size")
    @classmethod
    def _size_parses(cls, value: str | None) -> str | None:
        parse_size(value)
        return value


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    warnings: list[str] | None = None
    #: What this edit used: images, denoising steps, model_seconds and, with plan prices, cost (OpenAI's
    #: token counts have no meaning for a diffusion model, so its usage fields are ours).
    usage: dict[str, Any] | None = None


async def _source_data_url(form: ImageEditForm, service: GenerationService) -> str:
    """The one uploaded file as a data URL: the service sniffs the real format from the bytes."""
    if form.mask is not None:
        raise InvalidInputError(
            "mask is not supported: this service edits whole images (no inpainting)",
            code="unsupported_parameter",
            param="mask",
        )
    uploads = ([form.image] if form.image is not None else []) + form.image_list
    if not uploads:
        raise InvalidInputError(
            "image is required: send one file as 'image' or 'image[]'",
            code="missing_required_parameter",
            param="image",
        )
    if len(uploads) > 1:
        raise InvalidInputError(
            f"only one source image is supported, got {len(uploads)}", code="invalid_value", param="image"
        )
    limit = service.image_limits.max_bytes
    data = await uploads[0].read(limit + 1)
    if len(data) > limit:
        raise ImageTooLargeError(
            f"Image is over {limit} bytes; the maximum is {limit} bytes ({limit / 2**20:g} MiB).",
            param="image",
        )
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def resolve_alias(model: str | None, aliases: Mapping[str, str], service: GenerationService) -> str | None:
    """A client-facing name (``gpt-image-1``) → the served model it stands for; our own ids pass
    through. An unknown name is a 400 ``model_not_found`` listing our ids and the aliases."""
    if not model or model in service.registry.ids:
        return model or None
    if model in aliases:
        return aliases[model]
    names = [*service.registry.ids, *aliases]
    raise UnknownModelError(f"unknown model {model!r}; available models: {', '.join(names)}", param="model")


async def _image_data(
    done: CompletedCall, response_format: str, service: GenerationService
) -> list[ImageData]:
    if response_format == "url":
        return [ImageData(url=image.url) for image in done.images]
    contents = await asyncio.gather(*(service.store.get(image.key) for image in done.images))
    return [ImageData(b64_json=base64.b64encode(data).decode("ascii")) for data in contents]


@router.post(
    "/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The images; stream=true: server-sent events (partial images, then each image)",
        }
    },
)
async def create_image_edit(
    form: Annotated[ImageEditForm, Form(media_type="multipart/form-data")],
    service: ServiceDep,
    tenant: TenantDep,
    aliases: ModelAliasesDep,
    priority: PriorityDep,
):
    """Edit one image by prompt (image-to-image), the OpenAI way: multipart in, URLs or base64 out."""
    width, height = parse_size(form.size)
    image = await _source_data_url(form, service)
    model = resolve_alias(form.model, aliases, service)
    call = to_call(
        form,
        tenant,
        image,
        renames={"n": "num_images"},
        width=width,
        height=height,
        model=model,
        priority=priority,
    )
    if form.stream:
        prepared = await service.prepare(call)  # bad input, plan and quota: a JSON error, before the stream
        return StreamingResponse(
            edit_events(service, prepared, form.partial_images, DIALECT.error_body),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    done = await service.run(call)
    return ImagesResponse(
        created=int(done.call.created_at.timestamp()),
        data=await _image_data(done, form.response_format, service),
        warnings=list(done.warnings) or None,
        usage=done.usage_report(service.prices(tenant)),
    )


class OpenAIDialect(Dialect):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    def validation(self, errors: Sequence[Mapping[str, Any]]) -> ApiError:
        param, message, details = validation_summary(errors)
        kind = errors[0].get("type")
        if kind == "extra_forbidden":
            return ApiError(400, "unknown_parameter", f"Unknown parameter: '{param}'.", param=param)
        if param == "image[]":
            param = "image"
        code = "missing_required_parameter" if kind == "missing" else "invalid_value"
        return ApiError(400, code, details or message, param=param)  # OpenAI's body has no details

    def render(self, error: ApiError) -> JSONResponse:
        return JSONResponse(self.body(error), status_code=error.status, headers=error.headers or None)

    def error_body(self, error: Exception) -> dict[str, Any]:
        """A failure as OpenAI's envelope, for an error event inside a stream (no status to send)."""
        return self.body(self.translate(error))

    def body(self, error: ApiError) -> dict[str, Any]:
        if error.status == 429:
            kind = "rate_limit_error"
        elif error.status >= 500:
            kind = "server_error"
        else:  # OpenAI answers a bad key with 401 and type invalid_request_error too
            kind = "invalid_request_error"
        message = error.message
        if error.details and error.details != f"parameter: {error.param}":
            message = f"{message} ({error.details})"
        return {"error": {"message": message, "type": kind, "param": error.param, "code": error.code}}


DIALECT = OpenAIDialect(
    codes={
        AuthError: "invalid_api_key",
        RateLimitedError: "rate_limit_exceeded",
        PlanLimitError: "invalid_value",
    },
    params={"num_images": "n"},
)
