"""Ray-side plumbing shared by the ingress and the job coordinator: clients over the handles to model
replicas and to the coordination deployments (governor, job coordinator).

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
from inference.types import GenerationRequest, GenerationResult, Progress
from serve.config import ModelDeployment
from serve.deployments.warmup_status import describe, warming_replicas
from serve.errors import (
    Failure,
    GenerationTimeoutError,
    ModelUnavailableError,
    OverloadedError,
    ServingError,
)
from serve.generation.service import Admission, ProgressCallback
from serve.jobs.submission import Coordinator

logger = logging.getLogger(__name__)


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


def unwrap(error: RayTaskError, what: str) -> Failure:
    """The package error a remote call raised, or a GenerationError describing a crash."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, InferenceError | ServingError):
        return cause
    return GenerationError(what, details=str(cause or error)[:500])


class RemoteDeployment:
    """Calls to a coordination deployment (governor, job coordinator) by method name, with Ray's
    failures in the package's terms: its own errors come back as they were raised, and an unreachable
    deployment is ``unavailable`` (the governor's fails closed with 503: without it nobody's limits can
    be enforced). Any method of the deployment's class can be called: ``await remote.admit(...)``."""

    def __init__(self, handle: DeploymentHandle, name: str, unavailable: type[ServingError]) -> None:
        self._handle, self._name, self._unavailable = handle, name, unavailable

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(*args):
            try:
                return await getattr(self._handle, method).remote(*args)
            except RayTaskError as error:
                raise unwrap(error, f"the {self._name} failed") from None
            except (RayActorError, DeploymentUnavailableError, BackPressureError) as error:
                raise self._unavailable(
                    f"the {self._name} is unavailable; retry shortly", details=str(error)[:300]
                ) from None

        return call


def governor_client(handle: DeploymentHandle) -> Admission:
    return RemoteDeployment(handle, "tenant governor", OverloadedError)


def coordinator_client(handle: DeploymentHandle) -> Coordinator:
    return RemoteDeployment(handle, "job coordinator", ModelUnavailableError)
