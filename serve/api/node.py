"""``POST /v1/nodes/image_to_image``: the ``image_to_image`` node spec (seed 000).

Input ranges and defaults are the spec's: guidance_scale and image_guidance_scale in (0, 15] (7.5,
1.5), strength in (0, 1] (0.8), steps 1-50 (20), batch_size 1-8 (1), seed nullable, width/height 0 =
the source size. ``negative_prompt`` is required (it may be empty). ``prompt``, ``prompt_2`` and
``negative_prompt`` follow the text policy of every API (``inference.text_policy``: at most 2,000
characters, valid Unicode, no control characters but tab and line breaks). Errors use the spec's table as
codes: invalid_connection, source_image_error, empty_prompt, invalid_strength, invalid_guidance,
invalid_steps, batch_size_exceeded, generation_failed; other malformed fields (a prompt refused by the
text policy included: it is not empty) get invalid_parameter.
Extensions: ``model``, ``output_format``, and ``warnings`` in the output when a parameter was ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.errors import (
    GenerationError,
    ImageDimensionsError,
    ImageTooLargeError,
    InvalidImageError,
)
from inference.images import MAX_OUTPUT_SIDE
from inference.types import MAX_SEED
from serve.api.calls import to_call
from serve.api.deps import PriorityDep, ServiceDep, TenantDep
from serve.api.errors import ApiError, Dialect, error_responses
from serve.api.text_policy import NameText, PromptText
from serve.errors import AuthError, PlanLimitError

MAX_BATCH_SIZE = 8  # the spec's batch_size bound

router = APIRouter(prefix="/v1/nodes", tags=["nodes"], responses=error_responses())


class ImageToImageNodeInput(BaseModel):
    """Image to image node input."""

    model_config = ConfigDict(extra="forbid")

    source_image: str = Field(description="The image to use as the source (http(s) URL or data URL).")
    prompt: PromptText = Field(
        description="What you wish to see in the output image.",
        json_schema_extra={"minLength": 1, "pattern": r"\S"},  # documents the empty_prompt rule
    )
    prompt_2: PromptText | None = Field(None, description="A second prompt to guide the image generation.")
    negative_prompt: PromptText = Field(description="What you do not wish to see in the output image.")
    guidance_scale: float = Field(7.5, gt=0, le=15)
    image_guidance_scale: float = Field(1.5, gt=0, le=15)
    strength: float = Field(0.8, gt=0, le=1)
    steps: int = Field(20, gt=0, le=50, strict=True)
    batch_size: int = Field(1, gt=0, le=MAX_BATCH_SIZE, strict=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED - MAX_BATCH_SIZE, strict=True)
    width: int = Field(0, ge=0, le=MAX_OUTPUT_SIDE, strict=True, description="0 = the source image's width")
    height: int = Field(0, ge=0, le=MAX_OUTPUT_SIDE, strict=True, description="0 = the source image's height")
    model: NameText | None = Field(
        None, description="Model id (GET /v1/models); default: the first configured"
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value


class ImageToImageNodeOutput(BaseModel):
    """Image to image node output."""

    images: list[str]
    warnings: list[str] | None = None


@router.post("/image_to_image", response_model=ImageToImageNodeOutput, response_model_exclude_none=True)
async def image_to_image_node(
    body: ImageToImageNodeInput, service: ServiceDep, tenant: TenantDep, priority: PriorityDep
):
    """Run the node: returns the URLs of ``batch_size`` generated images."""
    call = to_call(body, tenant, body.source_image, renames={"batch_size": "num_images"}, priority=priority)
    done = await service.run(call)
    return ImageToImageNodeOutput(
        images=[image.url for image in done.images],
        warnings=list(done.warnings) or None,
    )


#: Prompt errors that are not "no prompt" (too long, or refused by the text policy): invalid_parameter.
_TEXT_ERRORS = {"string_too_long", "string_unicode", "text_policy"}


class NodeDialect(Dialect):
    """The node spec's error table; schema errors on a prompt that is not empty are invalid_parameter."""

    def validation(self, errors: Sequence[Mapping[str, Any]]) -> ApiError:
        error = super().validation(errors)
        if errors[0].get("type") in _TEXT_ERRORS:
            error.code = "invalid_parameter"
        return error


DIALECT = NodeDialect(
    codes={
        AuthError: "invalid_connection",
        InvalidImageError: "source_image_error",
        ImageTooLargeError: "source_image_error",
        ImageDimensionsError: "source_image_error",
        PlanLimitError: "batch_size_exceeded",
        GenerationError: "generation_failed",
    },
    params={"image": "source_image", "num_images": "batch_size"},
    field_codes={
        "source_image": "source_image_error",
        "prompt": "empty_prompt",
        "strength": "invalid_strength",
        "guidance_scale": "invalid_guidance",
        "image_guidance_scale": "invalid_guidance",
        "steps": "invalid_steps",
        "batch_size": "batch_size_exceeded",
    },
)
