"""``engine_request``: a ``GenerationRequest`` for engine tests, with the node spec's values for the
choices a test does not care about (the request type itself has no defaults: each API owns its own)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from inference.types import GenerationRequest

TEST_CHOICES: dict[str, Any] = {
    "strength": 0.8,
    "steps": 20,
    "guidance_scale": 7.5,
    "image_guidance_scale": 1.5,
}


def engine_request(
    request_id: str, model: str, prompt: str, image: Image.Image, **choices: Any
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, model=model, prompt=prompt, image=image, **{**TEST_CHOICES, **choices}
    )
