"""What every public API shares: resolve the source image, call the model, store outputs, describe them.

The REST, node and (later) OpenAI routes are thin translators between their wire schemas and a
``GenerationJob``; this module does the work once, so three APIs do not grow three copies of it.
It never imports torch: images arrive as bytes, leave as encoded files in the object store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
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
from inference.types import GenerationRequest, GenerationResult, Progress, draw_seed
from serve.fetch import FetchPolicy, fetch_image
from serve.governor import Limits
from serve.storage import ObjectStore, new_job_id, object_key
from serve.tenants import Tenant

ProgressCallback = Callable[[Progress], Awaitable[None]]


class ModelBackend(Protocol):
    """Where generation runs: Ray Serve model deployments in production, a fake in unit tests."""

    async def generate(
        self, model_id: str, request: GenerationRequest, on_progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """The request's images; ``on_progress`` (if given) is awaited after each denoising step."""
        ...

    async def readiness(self) -> dict[str, str | None]:
        """Model id → None when it can serve now, else why not (e.g. 'waiting for a GPU')."""
        ...


class Admission(Protocol):
    """Per-tenant limits shared by all replicas (``serve.governor``); absent in single-tenant tests."""

    async def admit(self, tenant: str, request_id: str, images: int, limits: Limits) -> None: ...

    async def release(self, tenant: str, request_id: str, usage: dict[str, float] | None) -> None: ...


class ModelNotAllowedError(InvalidInputError):
    """The tenant's plan does not include this model (HTTP 403)."""

    code = "model_not_allowed"


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
    key: str | None = None  # the object key in our store; None for an echoed external URL


@dataclass(frozen=True)
class PreparedJob:
    """A job whose model is known, whose source image is decoded and validated and whose seed is fixed.

    Everything that can be the caller's fault has been checked by now, so an API can answer 202 for an
    asynchronous job with confidence. ``source_key`` is set once the source bytes are in the store.
    """

    job: GenerationJob
    model: ModelSpec
    source: SourceImage
    source_bytes: bytes
    source_key: str | None = None


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
    unet_steps: int = 0
    compute_s: float = 0.0

    def usage(self) -> dict[str, float]:
        """What this job counts toward its tenant's usage."""
        return {
            "requests": 1,
            "images": len(self.images),
            "steps": self.unet_steps,
            "compute_seconds": self.compute_s,
        }


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
    admission: Admission | None = None
    tenant_lookup: Callable[[str], Tenant | None] = lambda name: None

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

    async def prepare(self, job: GenerationJob) -> PreparedJob:
        """Check everything that can be the caller's fault (model, plan, source image, size, limits).

        Fixes the seed. The job is admitted against its tenant's limits last, so a refused request
        costs no quota; from here on, ``release`` must be called once the job ends.
        """
        spec = self.registry.get(job.model)
        tenant = self.tenant_lookup(job.tenant)
        if tenant is not None:
            self._check_plan(tenant, spec.id, job.num_images)
        source, source_bytes = await self.load_source(job.image, job.image_param)
        output_size(source.width, source.height, job.width, job.height, min(spec.max_side, 2048))
        seed = job.seed if job.seed is not None else self.seed_source()
        if self.admission is not None:
            limits = (
                Limits(tenant.rate_limit_images_per_minute, tenant.concurrency_limit) if tenant else Limits()
            )
            await self.admission.admit(job.tenant, job.job_id, job.num_images, limits)
        return PreparedJob(replace(job, seed=seed), spec, source, source_bytes)

    @staticmethod
    def _check_plan(tenant: Tenant, model_id: str, images: int) -> None:
        if not tenant.allows_model(model_id):
            raise ModelNotAllowedError(
                f"model {model_id!r} is not in your plan; allowed: {', '.join(tenant.allowed_models or [])}",
                param="model",
            )
        if images > tenant.max_images_per_request:
            raise InvalidInputError(
                f"at most {tenant.max_images_per_request} images per request in your plan", param="num_images"
            )

    async def release(self, job: GenerationJob, done: CompletedJob | None) -> None:
        """The job ended (``done`` None: it failed or was canceled): free its slot, meter its usage."""
        if self.admission is not None:
            usage = done.usage() if done is not None else {"requests": 1}
            await self.admission.release(job.tenant, job.job_id, usage)

    async def restore(self, job: GenerationJob, source_key: str) -> PreparedJob:
        """A prepared job again, from its stored source (an asynchronous job resumed by another process)."""
        data = await self.store.get(source_key)
        source = await asyncio.to_thread(load_source_image, data, self.image_limits)
        return PreparedJob(job, self.registry.get(job.model), source, data, source_key)

    async def store_source(self, prepared: PreparedJob) -> PreparedJob:
        if prepared.source_key is not None:
            return prepared
        ext = file_extension(prepared.source.format)
        key = object_key(prepared.job.tenant, prepared.job.job_id, "source", ext, now=prepared.job.created_at)
        await self.store.put(key, prepared.source_bytes, content_type(prepared.source.format))
        return replace(prepared, source_key=key)

    def build_request(self, prepared: PreparedJob) -> GenerationRequest:
        job, spec, source = prepared.job, prepared.model, prepared.source
        size = output_size(source.width, source.height, job.width, job.height, min(spec.max_side, 2048))
        return GenerationRequest(
            request_id=job.job_id,
            model=spec.id,
            prompt=job.prompt,
            image=prepare_source(source, size),
            seed=job.seed,
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

    async def run(self, job: GenerationJob, on_progress: ProgressCallback | None = None) -> CompletedJob:
        """Prepare and execute in one go: the synchronous path."""
        prepared = await self.prepare(job)
        done = None
        try:
            done = await self.execute(prepared, on_progress)
            return done
        finally:
            await self.release(prepared.job, done)

    async def execute(
        self, prepared: PreparedJob, on_progress: ProgressCallback | None = None
    ) -> CompletedJob:
        """1. request, 2. generate, 3. store outputs (and an inline source), 4. describe."""
        job = prepared.job
        request = await asyncio.to_thread(self.build_request, prepared)
        result = await self.backend.generate(prepared.model.id, request, on_progress)
        stored = await asyncio.gather(
            *(self._store_output(job, i, image) for i, image in enumerate(result.images)),
            self._source_reference(prepared),
        )
        warnings = prepared.model.unused_parameter_warnings(job.explicitly_set) + result.warnings
        return CompletedJob(
            job=job,
            model=prepared.model,
            seed=request.seed,
            source=stored[-1],
            images=tuple(stored[:-1]),
            completed_at=datetime.now(UTC),
            warnings=warnings,
            queue_wait_s=result.queue_wait_s,
            run_s=result.run_s,
            unet_steps=result.unet_steps,
            compute_s=result.compute_s,
        )

    async def _store_output(self, job: GenerationJob, index: int, image) -> StoredImage:
        data = await asyncio.to_thread(encode_image, image, job.output_format)
        key = object_key(job.tenant, job.job_id, index, file_extension(job.output_format), now=job.created_at)
        await self.store.put(key, data, content_type(job.output_format))
        return StoredImage(await self.store.url(key, self.url_expiry_s), image.width, image.height, key)

    async def _source_reference(self, prepared: PreparedJob) -> StoredImage:
        """A URL source is echoed; an inline (base64) source is stored so the response can link it."""
        source, image = prepared.source, prepared.job.image.strip()
        if image.lower().startswith(("http://", "https://")):
            return StoredImage(image, source.width, source.height)
        key = (await self.store_source(prepared)).source_key
        return StoredImage(await self.store.url(key, self.url_expiry_s), source.width, source.height, key)
