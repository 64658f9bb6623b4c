"""The ingress deployment: the FastAPI app on Ray Serve, in front of model replicas and the job coordinator.

It validates and decodes every request itself (so a bad request never reaches a GPU replica),
runs synchronous requests, hands durable (asynchronous or idempotent) ones to the coordinator,
stores outputs and answers readiness.
"""

from __future__ import annotations

import logging
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from inference.errors import InferenceError
from serve.api.app import create_app
from serve.config import AppArgs, Secrets
from serve.deployments.handles import RayModelBackend, coordinator_client, governor_client
from serve.errors import ServingError
from serve.observability.metrics import IngressMetrics
from serve.wiring import preview_followers, wire

logger = logging.getLogger(__name__)

USAGE_FLUSH_INTERVAL_S = 30.0


@serve.ingress()
class Ingress:
    """Ray Serve ingress: builds the FastAPI app in the replica from validated args and env secrets.

    The app is built late (``__serve_build_asgi_app__``), inside the replica after the constructor:
    an app object created at import time would be pickled into the replica as a copy whose state the
    constructor could not reach.
    """

    def __init__(
        self,
        args: AppArgs,
        model_handles: dict[str, DeploymentHandle],
        coordinator: DeploymentHandle,
        governor: DeploymentHandle | None,
    ) -> None:
        """``governor`` is None when the control plane is Redis: limits are then checked from here."""
        backend = RayModelBackend(model_handles, args.models, args.request_timeout_s)
        self._wired = wire(args, Secrets(), backend, governor_client(governor) if governor else None)
        self._next_flush = 0.0
        self._jobs = coordinator_client(coordinator)
        self._bucket_ready = getattr(self._wired.store, "ensure_bucket", None)
        self._cors = args.cors
        self._model_aliases = dict(args.openai.model_aliases)
        logger.info("ingress ready: models %s, storage %s", ", ".join(args.registry().ids), args.storage.kind)

    def __serve_build_asgi_app__(self):
        app = create_app(cors=self._cors)
        app.state.service = self._wired.service
        app.state.jobs = self._jobs
        app.state.previews = preview_followers(self._wired, self._jobs)
        app.state.job_store = self._wired.records
        app.state.tenants = self._wired.tenants
        app.state.model_aliases = self._model_aliases
        app.state.usage = self._wired.limits
        app.state.metrics = IngressMetrics()
        return app

    async def check_health(self) -> None:
        """Every few seconds: re-read tenants (revoked keys stop working) and create the bucket once S3
        answers (storage may start after us). Storage trouble never fails the replica."""
        try:
            await self._wired.tenants.refresh()
        except (InferenceError, ServingError) as error:
            logger.warning("could not refresh tenants: %s", error)
        if self._bucket_ready is not None:
            try:
                await self._bucket_ready()
                self._bucket_ready = None
            except (InferenceError, ServingError) as error:
                logger.warning("output bucket not ready yet: %s", error)
        await self._flush_usage()

    async def _flush_usage(self) -> None:
        """With Redis limits, every ingress replica flushes hot usage hours now and then (the flush is
        idempotent, so replicas doing it at once is harmless)."""
        flush = getattr(self._wired.limits, "flush", None)
        if flush is None or time.monotonic() < self._next_flush:
            return
        self._next_flush = time.monotonic() + USAGE_FLUSH_INTERVAL_S
        try:
            await flush()
        except Exception as error:  # Redis or storage down: the next health check tries again
            logger.warning("could not flush usage yet: %s", error)
