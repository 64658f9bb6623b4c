"""What every public API shares: resolve the source image, call the model, store outputs, describe them.

The REST, node and (later) OpenAI routes are thin translators between their wire schemas and a
``GenerationJob``; this module does the work once, so three APIs do not grow three copies of it.
It never imports torch: images arrive as bytes, leave as encoded files in the object store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from inference.errors import InvalidImageError, InvalidInputError
from inference.images import (
    ImageLimits,
    SourceImage,
    content_type,
    decode_data_url,
    encode_image,
    file_extension,
    load_source_image,
    output_size,
    prepare_source,
)
from inference.models import ModelRegistry, ModelSpec
from inference.types import GenerationRequest, GenerationResult, draw_seed
from serve.fetch import FetchPolicy, fetch_image
from serve.storage import ObjectStore, new_job_id, object_key


class ModelBackend(Protocol):
    """Where generation runs: Ray Serve model deployments in production, a fake in unit tests."""

    async def generate(self, model_id: str, request: GenerationRequest) -> GenerationResult: ...

    async def readiness(self) -> dict[str, str | None]:
        """Model id → None when it can serve now, else why not (e.g. 'waiting for a GPU')."""
        ...


@dataclass(frozen=True)
class GenerationJob:
    """One API call, with every parameter already defaulted by the API that received it."""

    tenant: str
    image: str
    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    strength: float = 0.8
    steps: int = 20
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    num_images: int = 1
    seed: int | None = None
    width: int = 0
    height: int = 0
    output_format: str = "png"
    explicitly_set: frozenset[str] = frozenset()
    image_param: str = "image"
    job_id: str = field(default_factory=new_job_id)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class StoredImage:
    url: str
    width: int
    height: int


@dataclass(frozen=True)
class CompletedJob:
    job: GenerationJob
    model: ModelSpec
    seed: int
    source: StoredImage
    images: tuple[StoredImage, ...]
    completed_at: datetime
    warnings: tuple[str, ...]
    queue_wait_s: float
    run_s: float


@dataclass
class GenerationService:
    """Turns jobs into stored images; shared by every API router of one ingress replica."""

    registry: ModelRegistry
    backend: ModelBackend
    store: ObjectStore
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    url_expiry_s: int = 3600
    seed_source: Callable[[], int] = draw_seed

    async def load_source(self, image: str, param: str = "image") -> tuple[SourceImage, bytes]:
        """Decode a data URL or download an http(s) URL, then validate the bytes (size, format, bombs)."""
        text = image.strip()
        try:
            if text.lower().startswith("data:"):
                data = decode_data_url(text, self.image_limits.max_bytes)
            elif text.lower().startswith(("http://", "https://")):
                data = await fetch_image(text, self.fetch_policy, param=param)
            else:
                raise InvalidImageError(
                    "image must be an http(s) URL or a data URL (data:image/png;base64,...)"
                )
            return await asyncio.to_thread(load_source_image, data, self.image_limits), data
        except InvalidInputError as error:
            error.param = param  # each API names its own field (node: source_image)
            raise

    def build_request(self, job: GenerationJob, spec: ModelSpec, source: SourceImage) -> GenerationRequest:
        size = output_size(source.width, source.height, job.width, job.height, min(spec.max_side, 2048))
        return GenerationRequest(
            request_id=job.job_id,
            model=spec.id,
            prompt=job.prompt,
            image=prepare_source(source, size),
            seed=job.seed if job.seed is not None else self.seed_source(),
            negative_prompt=job.negative_prompt,
            prompt_2=job.prompt_2,
            negative_prompt_2=job.negative_prompt_2,
            strength=job.strength,
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            image_guidance_scale=job.image_guidance_scale,
            num_images=job.num_images,
            tenant=job.tenant,
        )

    async def run(self, job: GenerationJob) -> CompletedJob:
        """1. model, 2. source image, 3. request, 4. generate, 5. store outputs and source, 6. describe."""
        spec = self.registry.get(job.model)
        source, source_bytes = await self.load_source(job.image, job.image_param)
        request = await asyncio.to_thread(self.build_request, job, spec, source)
        result = await self.backend.generate(spec.id, request)
        stored = await asyncio.gather(
            *(self._store_output(job, i, image) for i, image in enumerate(result.images)),
            self._source_reference(job, source, source_bytes),
        )
        warnings = spec.unused_parameter_warnings(job.explicitly_set) + result.warnings
        return CompletedJob(
            job=job,
            model=spec,
            seed=request.seed,
            source=stored[-1],
            images=tuple(stored[:-1]),
            completed_at=datetime.now(UTC),
            warnings=warnings,
            queue_wait_s=result.queue_wait_s,
            run_s=result.run_s,
        )

    async def _store_output(self, job: GenerationJob, index: int, image) -> StoredImage:
        data = await asyncio.to_thread(encode_image, image, job.output_format)
        key = object_key(job.tenant, job.job_id, index, file_extension(job.output_format))
        await self.store.put(key, data, content_type(job.output_format))
        return StoredImage(await self.store.url(key, self.url_expiry_s), image.width, image.height)

    async def _source_reference(self, job: GenerationJob, source: SourceImage, data: bytes) -> StoredImage:
        """A URL source is echoed; an inline (base64) source is stored so the response can link it."""
        if not job.image.strip().lower().startswith("data:"):
            return StoredImage(job.image.strip(), source.width, source.height)
        key = object_key(job.tenant, job.job_id, "source", file_extension(source.format))
        await self.store.put(key, data, content_type(source.format))
        return StoredImage(await self.store.url(key, self.url_expiry_s), source.width, source.height)
