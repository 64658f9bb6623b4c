"""Ray-side plumbing shared by the ingress and the job coordinator: handles to model replicas and to
the coordinator, and construction of the generation service from validated args and secrets.

Ray-specific failures are translated here into the package's error classes, so the API layer maps
them to HTTP without knowing Ray.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from inference.errors import GenerationError, InferenceError
from inference.images import ImageLimits, SourceImage
from inference.types import GenerationRequest, GenerationResult, Progress
from serve.config import AppArgs, ModelDeployment, Secrets, build_store
from serve.deployments.warmup_status import describe, warming_replicas
from serve.errors import GenerationTimeoutError, ModelUnavailableError, OverloadedError
from serve.generation.service import GenerationService, ProgressCallback
from serve.jobs.records import JobRecord
from serve.outbound.fetch import FetchPolicy

logger = logging.getLogger("serve.deployments.handles")


class RayModelBackend:
    """``ModelBackend`` over Ray Serve handles, one per model deployment.

    A replica that dies mid-request (process crash, node lost) is not the caller's problem: the
    request is sent again, once, to whichever replica Serve routes it to (the replacement, or a
    sibling), within the same deadline. Generation is a pure function of the request (seeds
    included), so the retry returns what the first attempt would have.
    """

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        models: list[ModelDeployment],
        timeout_s: float,
        replica_retries: int = 1,
    ):
        self._handles = handles
        self._models = {m.spec["id"]: m for m in models}
        self._timeout_s = timeout_s
        self._replica_retries = replica_retries
        self._app_name = _current_app_name()

    async def generate(
        self, model_id: str, request: GenerationRequest, on_progress: ProgressCallback | None = None
    ) -> GenerationResult:
        try:
            async with asyncio.timeout(self._timeout_s):
                for attempt in range(self._replica_retries + 1):
                    try:
                        return await self._generate_once(model_id, request, on_progress)
                    except RayActorError as error:
                        if attempt == self._replica_retries:
                            raise
                        logger.warning(
                            "model %s replica died during request %s; retrying (%s)",
                            model_id,
                            request.request_id,
                            str(error)[:200],
                        )
                raise AssertionError("unreachable")  # the loop returns or raises
        except TimeoutError:
            raise GenerationTimeoutError(
                f"generation did not finish within {self._timeout_s:.0f}s; the request was canceled"
            ) from None
        except BackPressureError:
            raise OverloadedError(f"model {model_id} is at capacity; retry shortly") from None
        except RayTaskError as error:
            raise unwrap(error, "the model replica failed") from None
        except (RayActorError, DeploymentUnavailableError) as error:
            raise ModelUnavailableError(
                f"model {model_id} replica is unavailable", details=str(error)[:300]
            ) from None

    async def _generate_once(
        self, model_id: str, request: GenerationRequest, on_progress: ProgressCallback | None
    ) -> GenerationResult:
        if on_progress is None:
            return await self._handles[model_id].generate.remote(request)
        stream = self._handles[model_id].options(stream=True).generate_stream.remote(request)
        async for item in stream:
            if isinstance(item, Progress):
                await on_progress(item)
            else:
                return item
        raise GenerationError("the model replica ended the stream without a result")

    async def readiness(self) -> dict[str, str | None]:
        cluster = ray.cluster_resources()
        results = await asyncio.gather(*(self._model_ready(mid, cluster) for mid in self._handles))
        return dict(zip(self._handles, results, strict=True))

    async def _model_ready(self, model_id: str, cluster: dict[str, float]) -> str | None:
        model = self._models[model_id]
        if model.num_gpus and cluster.get("GPU", 0) < model.num_gpus:
            return f"needs {model.num_gpus} GPU per replica; the cluster has {cluster.get('GPU', 0):g} GPUs"
        for resource, amount in model.resources.items():
            if cluster.get(resource, 0) < amount:
                return f"needs resource {resource}={amount:g}; the cluster has {cluster.get(resource, 0):g}"
        try:
            async with asyncio.timeout(3):
                await self._handles[model_id].ready.remote()
        except TimeoutError:
            warming = describe(await asyncio.to_thread(warming_replicas, self._app_name, model_id))
            return warming or "no replica answered within 3s (starting, or busy loading the model)"
        except Exception as error:  # any failure is "not ready", with its reason
            return f"replica check failed: {type(error).__name__}: {str(error)[:200]}"
        return None


def _current_app_name() -> str:
    """The Serve application this replica belongs to (model ids repeat across applications)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # outside a replica (scripts, tests): no application
        return ""


def unwrap(error: RayTaskError, what: str) -> InferenceError:
    """The package error a remote call raised, or a GenerationError describing a crash."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, InferenceError):
        return cause
    return GenerationError(what, details=str(cause or error)[:500])


class _Remote:
    """Calls to a single-replica coordination deployment, with Ray failures in the package's terms."""

    name = "deployment"
    unavailable = ModelUnavailableError

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def _call(self, method: str, *args):
        try:
            return await getattr(self._handle, method).remote(*args)
        except RayTaskError as error:
            raise unwrap(error, f"the {self.name} failed") from None
        except (RayActorError, DeploymentUnavailableError, BackPressureError) as error:
            raise self.unavailable(
                f"the {self.name} is unavailable; retry shortly", details=str(error)[:300]
            ) from None


class RayJobs(_Remote):
    """The job coordinator deployment behind the same methods as an in-process ``JobRunner``."""

    name = "job coordinator"

    async def accept(
        self,
        record: JobRecord,
        idempotency: tuple[str, str] | None = None,
        source: SourceImage | None = None,
    ) -> str:
        return await self._call("accept", record, idempotency, source)  # the decoded source: decode once

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        return await self._call("cancel", tenant, job_id)

    async def wait(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord | None:
        return await self._call("wait", tenant, job_id, timeout_s)


def build_service(
    parsed: AppArgs,
    secrets: Secrets,
    model_handles: dict[str, DeploymentHandle],
    governor: DeploymentHandle | None = None,
    tenant_lookup=None,
    store=None,
) -> GenerationService:
    """The generation service of one process (ingress or coordinator), wired to Ray handles."""
    service = GenerationService(
        registry=parsed.registry(),
        backend=RayModelBackend(model_handles, parsed.models, parsed.request_timeout_s),
        store=store or build_store(parsed, secrets),
        fetch_policy=FetchPolicy(
            allow_networks=parsed.fetch.allow_networks,
            total_timeout_s=parsed.fetch.timeout_s,
            allow_plain_http_webhooks=parsed.webhooks.allow_plain_http,
        ),
        image_limits=ImageLimits(),
        url_expiry_s=parsed.storage.url_expiry_s,
        admission=RayGovernor(governor) if governor is not None else None,
    )
    if tenant_lookup is not None:
        service.tenant_lookup = tenant_lookup
    return service


class RayGovernor(_Remote):
    """``Admission`` over the tenant governor deployment: limits that hold across ingress replicas.

    It fails closed (503): without the governor nobody's limits can be enforced.
    """

    name = "tenant governor"
    unavailable = OverloadedError

    async def admit(self, tenant: str, request_id: str, images: int, limits) -> None:
        await self._call("admit", tenant, request_id, images, limits)

    async def release(self, tenant: str, request_id: str, usage: dict[str, float] | None) -> None:
        await self._call("release", tenant, request_id, usage)

    async def usage(self, tenant: str, start, end) -> dict[str, float]:
        return await self._call("usage", tenant, start, end)
