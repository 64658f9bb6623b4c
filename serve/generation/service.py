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
    ImageHeader,
    ImageLimits,
    SourceImage,
    content_type,
    decode_data_url,
    decode_source_image,
    encode_image,
    file_extension,
    inspect_source_image,
    load_source_image,
    output_size,
    prepare_source,
)
from inference.models import ModelRegistry, ModelSpec
from inference.types import GenerationRequest, GenerationResult, Progress, draw_seed
from serve.outbound.fetch import FetchPolicy, fetch_image
from serve.storage.objects import ObjectStore, new_job_id, object_key
from serve.tenancy.governor import Limits
from serve.tenancy.tenants import Tenant

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
    """Per-tenant limits for all replicas (``serve.tenancy.governor``); none in single-tenant tests."""

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

    async def fetch_source(self, image: str, param: str = "image") -> bytes:
        """The source's bytes: a data URL decoded (size checked from its length first) or an http(s) URL
        downloaded under the fetch policy. No image decoding happens here."""
        text = image.strip()
        try:
            if text.lower().startswith("data:"):
                return decode_data_url(text, self.image_limits.max_bytes)
            if text.lower().startswith(("http://", "https://")):
                return await fetch_image(text, self.fetch_policy, param=param)
            raise InvalidImageError("image must be an http(s) URL or a data URL (data:image/png;base64,...)")
        except InvalidInputError as error:
            error.param = param  # each API names its own field (node: source_image)
            raise

    async def inspect_source(self, data: bytes, param: str = "image") -> ImageHeader:
        """The cheap checks (format, structure, scan and chunk counts, header size): no pixel decoded."""
        try:
            return await asyncio.to_thread(inspect_source_image, data, self.image_limits)
        except InvalidInputError as error:
            error.param = param
            raise

    async def decode_source(self, data: bytes, header: ImageHeader, param: str = "image") -> SourceImage:
        """The expensive part, for bytes ``inspect_source`` passed: the decode, bounded by its limits."""
        try:
            return await asyncio.to_thread(decode_source_image, data, header, self.image_limits)
        except InvalidInputError as error:
            error.param = param
            raise

    async def load_source(self, image: str, param: str = "image") -> tuple[SourceImage, bytes]:
        """Fetch, inspect and decode a source in one go (no admission in between)."""
        data = await self.fetch_source(image, param)
        header = await self.inspect_source(data, param)
        return await self.decode_source(data, header, param), data

    async def prepare(self, job: GenerationJob) -> PreparedJob:
        """Check everything that can be the caller's fault (model, plan, source image, size, limits).

        Fixes the seed. The job is admitted against its tenant's limits after every cheap check (a
        request refused by those costs no quota) and BEFORE the source's pixels are decoded, the one
        step whose cost an attacker controls: a flood of hostile images is stopped by the tenant's
        rate and concurrency limits, not paid for in CPU. From admission on, ``release`` must be
        called once the job ends (this method does it itself if the decode fails).
        """
        spec = self.registry.get(job.model)
        tenant = self.tenant_lookup(job.tenant)
        if tenant is not None:
            self._check_plan(tenant, spec.id, job.num_images)
        source_bytes = await self.fetch_source(job.image, job.image_param)
        header = await self.inspect_source(source_bytes, job.image_param)
        # Only the requested width/height can fail here; EXIF orientation cannot change that.
        output_size(
            header.width, header.height, job.width, job.height, min(spec.max_side, 2048), spec.size_multiple
        )
        seed = job.seed if job.seed is not None else self.seed_source()
        if self.admission is not None:
            limits = (
                Limits(tenant.rate_limit_images_per_minute, tenant.concurrency_limit) if tenant else Limits()
            )
            await self.admission.admit(job.tenant, job.job_id, job.num_images, limits)
        try:
            source = await self.decode_source(source_bytes, header, job.image_param)
        except BaseException:
            await self.release(job, None)
            raise
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

    async def restore(
        self, job: GenerationJob, source_key: str, source: SourceImage | None = None
    ) -> PreparedJob:
        """A prepared job again, from its stored source (an asynchronous job run by the coordinator).

        ``source`` is the image the ingress already decoded, handed over with the job: then nothing is
        read or decoded again (decode once). Without it (a job resumed after a restart) the stored
        bytes are decoded under the same limits as at the ingress, which they passed there.
        """
        spec = self.registry.get(job.model)
        if source is not None:
            return PreparedJob(job, spec, source, b"", source_key)  # the bytes are in the store already
        data = await self.store.get(source_key)
        source = await asyncio.to_thread(load_source_image, data, self.image_limits)
        return PreparedJob(job, spec, source, data, source_key)

    async def store_source(self, prepared: PreparedJob) -> PreparedJob:
        if prepared.source_key is not None:
            return prepared
        ext = file_extension(prepared.source.format)
        key = object_key(prepared.job.tenant, prepared.job.job_id, "source", ext, now=prepared.job.created_at)
        await self.store.put(key, prepared.source_bytes, content_type(prepared.source.format))
        return replace(prepared, source_key=key)

    async def discard_source(self, prepared: PreparedJob) -> None:
        """Delete the stored source of a job that will never run (a concurrent request with the same
        Idempotency-Key won the key), so a replay leaves no orphaned object behind."""
        if prepared.source_key is not None:
            await self.store.delete(prepared.source_key)

    def build_request(self, prepared: PreparedJob) -> GenerationRequest:
        job, spec, source = prepared.job, prepared.model, prepared.source
        size = output_size(
            source.width, source.height, job.width, job.height, min(spec.max_side, 2048), spec.size_multiple
        )
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
            # A caller who chose no guidance gets the model's own (FLUX.1's distilled 3.5, SD3's 7.0),
            # as GET /v1/models says; the API default is what the SD-class models are made for.
            guidance_scale=(
                job.guidance_scale if "guidance_scale" in job.explicitly_set else spec.default_guidance_scale
            ),
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
