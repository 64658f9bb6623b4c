"""OpenAI's streaming image edits (``stream=true``): server-sent events in OpenAI's shapes.

``partial_images`` N (0-3) asks for up to N ``image_edit.partial_image`` events while the first image
is denoised: previews of its latents (``inference.previews``), spread evenly over its steps and
scaled to the output size that ``size`` names. Then one ``image_edit.completed`` per image, with the
stored image's bytes and the call's ``usage``. A failure after the stream began is one ``error``
event in OpenAI's envelope (the ``openai`` client raises it as ``APIError``); failures before (bad
input, unknown model, quota) are ordinary JSON error responses. A client that disconnects cancels
the generation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from PIL import Image

from inference.errors import InferenceError
from inference.images import encode_image
from inference.types import Preview
from serve.errors import ServingError
from serve.generation.calls import CompletedCall, PreparedCall
from serve.generation.service import GenerationService
from serve.generation.streaming import preview_interval, stream_call

logger = logging.getLogger(__name__)

#: Fields of OpenAI's events that describe options this service does not offer: fixed values.
FIXED_FIELDS = {"quality": "auto", "background": "opaque"}


def sse(event: str, body: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(body)}\n\n"


async def _partial_event(preview: Preview, index: int, size: tuple[int, int], output_format: str) -> str:
    """A preview as OpenAI's partial image: scaled to the output size, in the output format."""

    def encode() -> bytes:
        return encode_image(preview.image.resize(size, Image.Resampling.BILINEAR), output_format)

    data = await asyncio.to_thread(encode)
    return sse(
        "image_edit.partial_image",
        {
            "type": "image_edit.partial_image",
            "b64_json": base64.b64encode(data).decode("ascii"),
            "partial_image_index": index,
            "size": f"{size[0]}x{size[1]}",
            "output_format": output_format,
            "created_at": int(time.time()),
            **FIXED_FIELDS,
        },
    )


async def _completed_events(done: CompletedCall, service: GenerationService) -> AsyncIterator[str]:
    usage = done.usage_report(service.prices(done.call.tenant))
    for image in done.images:
        data = await service.store.get(image.key)
        yield sse(
            "image_edit.completed",
            {
                "type": "image_edit.completed",
                "b64_json": base64.b64encode(data).decode("ascii"),
                "size": f"{image.width}x{image.height}",
                "output_format": done.call.output_format,
                "created_at": int(done.completed_at.timestamp()),
                "usage": usage,
                **FIXED_FIELDS,
            },
        )


async def edit_events(
    service: GenerationService,
    prepared: PreparedCall,
    partial_images: int,
    error_body: Callable[[Exception], dict[str, Any]],
) -> AsyncIterator[str]:
    """The event stream of one prepared edit; ``error_body`` renders a failure in OpenAI's envelope."""
    call, source = prepared.call, prepared.source
    size = service.output_size(prepared.model, source.width, source.height, call.params)
    every = preview_interval(call.params.steps, call.params.strength, partial_images)
    events = stream_call(service, prepared, every)
    sent = 0
    try:
        async for item in events:
            if isinstance(item, Preview):
                if item.image_index == 0 and sent < partial_images:
                    yield await _partial_event(item, sent, size, call.output_format)
                    sent += 1
                continue
            async for event in _completed_events(item, service):
                yield event
    except (InferenceError, ServingError) as error:
        logger.warning("streamed edit %s failed: %s: %s", call.id, error.code, error)
        yield sse("error", error_body(error))
    finally:
        await events.aclose()
