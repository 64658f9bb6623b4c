"""What the OpenAPI fuzzing runs share: hypothesis settings, the checks, and the real-image swap.

Used in-process against the app with a fake model (tests/unit/test_openapi_fuzz.py) and over HTTP
against the real Ray Serve stack (tests/integration/test_openapi_fuzz_stack.py).
"""

from __future__ import annotations

import base64
import io
import os

import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis import GenerationMode


def fuzz_settings(default_examples: int) -> settings:
    """``FUZZ_EXAMPLES`` examples per operation; derandomised (reproducible CI) unless ``FUZZ_RANDOM=1``."""
    return settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", default_examples)),
        deadline=None,
        derandomize=os.environ.get("FUZZ_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
        database=None,
    )


#: Every built-in check but one: a schema-valid string need not be a decodable image, a well-formed
#: model id need not exist, so a schema-valid request may rightly get a 4xx.
EXCLUDED_CHECKS = [schemathesis.checks.positive_data_acceptance]
IMAGE_FIELDS = ("image", "source_image")


def _png(width: int = 40, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


SOURCE_PNG = _png()
SOURCE_DATA_URL = "data:image/png;base64," + base64.b64encode(SOURCE_PNG).decode()


def authorise(case, headers: dict[str, str]) -> None:
    case.headers = {**(case.headers or {}), **headers}


def with_real_image(case, model_ids: list[str], caps: dict[str, int] | None = None) -> bool:
    """Put a decodable source image (and a served model) into a schema-valid body, so the fuzzed
    parameters reach generation instead of stopping at image decoding. ``caps`` bounds costly
    integers (steps, image counts, sizes) for runs on a real model. False when there is no image."""
    body = case.body
    if not isinstance(body, dict) or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return False
    fields = [name for name in IMAGE_FIELDS if name in body]
    for name in fields:
        body[name] = SOURCE_PNG if case.media_type == "multipart/form-data" else SOURCE_DATA_URL
    if isinstance(body.get("model"), str):
        body["model"] = model_ids[len(body["model"]) % len(model_ids)]
    for name, cap in (caps or {}).items():
        if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > cap:
            body[name] = cap
    return bool(fields)
