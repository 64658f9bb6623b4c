"""What every public API shares: resolve the source image, call the model, store outputs, describe them.

The REST, node and OpenAI routes are thin translators between their wire schemas and a
``GenerationCall``; this module does the work once, so three APIs do not grow three copies of it.
It never imports torch: images arrive as bytes, leave as encoded files in the object store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Protocol

from inference.errors import InvalidImageError, InvalidInputError
from inference.images import (
    MAX_OUTPUT_SIDE,
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
from inference.types import GenerationParams, GenerationRequest, GenerationResult, Progress, draw_seed
from serve.errors import ModelNotAllowedError, PlanLimitError
from serve.generation.calls import CompletedCall, GenerationCall, PreparedCall, StoredImage
from serve.outbound.fetch import FetchPolicy, fetch_image
from serve.storage.objects import ObjectStore, object_key
from serve.tenancy.governor import Limits
from serve.tenancy.tenants import Prices, Tenant

ProgressCallback = Callable[[Progress], Awaitable[None]]
LANES = {"high": 0, "normal": 1, "low": 2}


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


@dataclass
class GenerationService:
    """Turns calls into stored images; shared by every API router of one ingress replica."""

    registry: ModelRegistry
    backend: ModelBackend
    store: ObjectStore
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    url_expiry_s: int = 3600
    max_side: int = MAX_OUTPUT_SIDE  # AppArgs.max_side: the longest output side, for every model
    seed_source: Callable[[], int] = draw_seed
    admission: Admission | None = None
    tenant_lookup: Callable[[str], Tenant | None] = lambda name: None

    async def fetch_source(self, image: str) -> bytes:
        """The source's bytes: a data URL decoded (size checked from its length first) or an http(s) URL
        downloaded under the fetch policy. No image decoding happens here. Errors name ``image``; each
        API's dialect renames it to its own field (node: ``source_image``)."""
        text = image.strip()
        try:
            if text.lower().startswith("data:"):
                return decode_data_url(text, self.image_limits.max_bytes)
            if text.lower().startswith(("http://", "https://")):
                return await fetch_image(text, self.fetch_policy, param="image")
            raise InvalidImageError("image must be an http(s) URL or a data URL (data:image/png;base64,...)")
        except InvalidInputError as error:
            error.param = "image"
            raise

    async def inspect_source(self, data: bytes) -> ImageHeader:
        """The cheap checks (format, structure, scan and chunk counts, header size): no pixel decoded."""
        try:
            return await asyncio.to_thread(inspect_source_image, data, self.image_limits)
        except InvalidInputError as error:
            error.param = "image"
            raise

    async def decode_source(self, data: bytes, header: ImageHeader) -> SourceImage:
        """The expensive part, for bytes ``inspect_source`` passed: the decode, bounded by its limits."""
        try:
            return await asyncio.to_thread(decode_source_image, data, header, self.image_limits)
        except InvalidInputError as error:
            error.param = "image"
            raise

    def output_size(self, spec: ModelSpec, source_w: int, source_h: int, params: GenerationParams):
        """(width, height) of the outputs: the requested size (or the source's), in multiples of the
        model's size unit, the longer side at most ``max_side`` (the model's own bound if lower)."""
        limit = min(spec.max_side, self.max_side)
        return output_size(source_w, source_h, params.width, params.height, limit, spec.size_multiple)

    def resolve(self, params: GenerationParams, spec: ModelSpec) -> GenerationParams:
        """Every choice the caller left out, made: a fresh seed, and the model's own guidance scales
        (what ``GET /v1/models`` advertises as its defaults)."""
        return replace(
            params,
            seed=params.seed if params.seed is not None else self.seed_source(),
            guidance_scale=(
                params.guidance_scale if params.guidance_scale is not None else spec.default_guidance_scale
            ),
            image_guidance_scale=(
                params.image_guidance_scale
                if params.image_guidance_scale is not None
                else spec.default_image_guidance_scale
            ),
        )

    async def prepare(self, call: GenerationCall) -> PreparedCall:
        """Check everything that can be the caller's fault (model, plan, source image, size, limits).

        Resolves every open choice. The call is admitted against its tenant's limits after every cheap
        check (a request refused by those costs no quota) and BEFORE the source's pixels are decoded,
        the one step whose cost an attacker controls: a flood of hostile images is stopped by the
        tenant's rate and concurrency limits, not paid for in CPU. From admission on, ``release`` must
        be called once the call ends (this method does it itself if the decode fails).
        """
        spec = self.registry.get(call.model)
        tenant = self.tenant_lookup(call.tenant)
        if tenant is not None:
            self._check_plan(tenant, spec.id, call.params.num_images)
        source_bytes = await self.fetch_source(call.image)
        header = await self.inspect_source(source_bytes)
        # Only the requested width/height can fail here; EXIF orientation cannot change that.
        self.output_size(spec, header.width, header.height, call.params)
        resolved = replace(call, params=self.resolve(call.params, spec))
        if self.admission is not None:
            limits = (
                Limits(tenant.rate_limit_images_per_minute, tenant.concurrency_limit) if tenant else Limits()
            )
            await self.admission.admit(call.tenant, call.id, call.params.num_images, limits)
        try:
            source = await self.decode_source(source_bytes, header)
        except BaseException:
            await self.release(call, None)
            raise
        return PreparedCall(resolved, spec, source, source_bytes)

    @staticmethod
    def _check_plan(tenant: Tenant, model_id: str, images: int) -> None:
        if not tenant.allows_model(model_id):
            raise ModelNotAllowedError(
                f"model {model_id!r} is not in your plan; allowed: {', '.join(tenant.allowed_models or [])}",
                param="model",
            )
        if images > tenant.max_images_per_request:
            raise PlanLimitError(
                f"at most {tenant.max_images_per_request} images per request in your plan", param="num_images"
            )

    def prices(self, tenant: str) -> Prices | None:
        """The tenant's plan prices, if it has any (jobs and usage then carry a cost)."""
        found = self.tenant_lookup(tenant)
        return found.prices if found is not None else None

    async def release(self, call: GenerationCall, done: CompletedCall | None) -> None:
        """The call ended (``done`` None: it failed or was canceled): free its slot, meter its usage."""
        if self.admission is not None:
            usage = done.usage() if done is not None else {"requests": 1}
            await self.admission.release(call.tenant, call.id, usage)

    async def restore(
        self, call: GenerationCall, source_key: str, source: SourceImage | None = None
    ) -> PreparedCall:
        """A prepared call again, from its stored source (an asynchronous job run by the coordinator).

        ``source`` is the image the ingress already decoded, handed over with the job: then nothing is
        read or decoded again (decode once). Without it (a job resumed after a restart) the stored
        bytes are decoded under the same limits as at the ingress, which they passed there.
        """
        spec = self.registry.get(call.model)
        if source is not None:
            return PreparedCall(call, spec, source, b"", source_key)  # the bytes are in the store already
        data = await self.store.get(source_key)
        source = await asyncio.to_thread(load_source_image, data, self.image_limits)
        return PreparedCall(call, spec, source, data, source_key)

    async def store_source(self, prepared: PreparedCall) -> PreparedCall:
        if prepared.source_key is not None:
            return prepared
        call, ext = prepared.call, file_extension(prepared.source.format)
        key = object_key(call.tenant, call.id, "source", ext, now=call.created_at)
        await self.store.put(key, prepared.source_bytes, content_type(prepared.source.format))
        return replace(prepared, source_key=key)

    async def discard_source(self, prepared: PreparedCall) -> None:
        """Delete the stored source of a call that will never run (a concurrent request with the same
        Idempotency-Key won the key), so a replay leaves no orphaned object behind."""
        if prepared.source_key is not None:
            await self.store.delete(prepared.source_key)

    def build_request(self, prepared: PreparedCall, preview_every: int = 0) -> GenerationRequest:
        call, spec, source = prepared.call, prepared.model, prepared.source
        width, height = self.output_size(spec, source.width, source.height, call.params)
        choices = {f.name: getattr(call.params, f.name) for f in fields(GenerationParams)}
        return GenerationRequest(
            **{**choices, "width": width, "height": height},
            request_id=call.id,
            model=spec.id,
            image=prepare_source(source, (width, height)),
            tenant=call.tenant,
            priority=self.lane(call),
            preview_every=preview_every,
        )

    def lane(self, call: GenerationCall) -> int:
        """The engine lane of a call (0 high, 1 normal, 2 low): its plan's priority, or lower if the
        caller asked for less; asking for more than the plan gives changes nothing."""
        tenant = self.tenant_lookup(call.tenant)
        plan = LANES[tenant.priority] if tenant is not None else LANES["normal"]
        return max(plan, LANES.get(call.priority or "", plan))

    async def run(self, call: GenerationCall, on_progress: ProgressCallback | None = None) -> CompletedCall:
        """Prepare and execute in one go: the synchronous path."""
        prepared = await self.prepare(call)
        done = None
        try:
            done = await self.execute(prepared, on_progress)
            return done
        finally:
            await self.release(prepared.call, done)

    async def execute(
        self, prepared: PreparedCall, on_progress: ProgressCallback | None = None, preview_every: int = 0
    ) -> CompletedCall:
        """1. request, 2. generate, 3. store outputs (and an inline source), 4. describe.

        ``preview_every`` k > 0 asks the engine for a preview of each image every k steps; they arrive
        in ``Progress.previews`` through ``on_progress``."""
        call = prepared.call
        request = await asyncio.to_thread(self.build_request, prepared, preview_every)
        result = await self.backend.generate(prepared.model.id, request, on_progress)
        stored = await asyncio.gather(
            *(self._store_output(call, i, image) for i, image in enumerate(result.images)),
            self._source_reference(prepared),
        )
        warnings = prepared.model.unused_parameter_warnings(call.explicitly_set) + result.warnings
        return CompletedCall(
            call=call,
            model=prepared.model,
            source=stored[-1],
            images=tuple(stored[:-1]),
            completed_at=datetime.now(UTC),
            warnings=warnings,
            queue_wait_s=result.queue_wait_s,
            run_s=result.run_s,
            unet_steps=result.unet_steps,
            compute_s=result.compute_s,
        )

    async def _store_output(self, call: GenerationCall, index: int, image) -> StoredImage:
        data = await asyncio.to_thread(encode_image, image, call.output_format)
        key = object_key(call.tenant, call.id, index, file_extension(call.output_format), now=call.created_at)
        await self.store.put(key, data, content_type(call.output_format))
        return StoredImage(await self.store.url(key, self.url_expiry_s), image.width, image.height, key)

    async def _source_reference(self, prepared: PreparedCall) -> StoredImage:
        """A URL source is echoed; an inline (base64) source is stored so the response can link it."""
        source, call = prepared.source, prepared.call
        if call.source_is_url:
            return StoredImage(call.image.strip(), source.width, source.height)
        key = (await self.store_source(prepared)).source_key
        return StoredImage(await self.store.url(key, self.url_expiry_s), source.width, source.height, key)
