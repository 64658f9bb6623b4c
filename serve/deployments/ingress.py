"""The ingress deployment: the FastAPI app on Ray Serve, in front of model replicas and the job coordinator.

It validates and decodes every request itself (so a bad request never reaches a GPU replica),
runs synchronous requests, hands durable (asynchronous or idempotent) ones to the coordinator,
stores outputs and answers readiness.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from inference.errors import InferenceError
from serve.api.app import create_app
from serve.config import AppArgs, Secrets, build_store, configured_tenants
from serve.deployments.handles import RayGovernor, RayJobs, build_service
from serve.jobs.records import JobStore
from serve.observability.metrics import IngressMetrics
from serve.tenancy.tenants import TenantCatalog, TenantStore

logger = logging.getLogger("serve.deployments.ingress")


@serve.ingress()
class Ingress:
    """Ray Serve ingress: builds the FastAPI app in the replica from validated args and env secrets.

    The app is built late (``__serve_build_asgi_app__``), inside the replica after the constructor:
    an app object created at import time would be pickled into the replica as a copy whose state the
    constructor could not reach.
    """

    def __init__(
        self,
        args: dict[str, Any],
        model_handles: dict[str, DeploymentHandle],
        coordinator: DeploymentHandle,
        governor: DeploymentHandle,
    ) -> None:
        parsed = AppArgs.model_validate(args)
        secrets = Secrets()
        store = build_store(parsed, secrets)
        self._tenants = TenantCatalog(configured_tenants(parsed, secrets), TenantStore(store))
        self._service = build_service(parsed, secrets, model_handles, governor, self._tenants.lookup, store)
        self._jobs = RayJobs(coordinator)
        self._governor = RayGovernor(governor)
        self._bucket_ready = getattr(self._service.store, "ensure_bucket", None)
        self._cors = parsed.cors
        logger.info(
            "ingress ready: models %s, storage %s", ", ".join(parsed.registry().ids), parsed.storage.kind
        )

    def __serve_build_asgi_app__(self):
        app = create_app(cors=self._cors)
        app.state.service = self._service
        app.state.jobs = self._jobs
        app.state.job_store = JobStore(self._service.store)
        app.state.tenants = self._tenants
        app.state.usage = self._governor
        app.state.metrics = IngressMetrics()
        return app

    async def check_health(self) -> None:
        """Every few seconds: re-read tenants (revoked keys stop working) and create the bucket once S3
        answers (storage may start after us). Storage trouble never fails the replica."""
        try:
            await self._tenants.refresh()
        except InferenceError as error:
            logger.warning("could not refresh tenants: %s", error)
        if self._bucket_ready is not None:
            try:
                await self._bucket_ready()
                self._bucket_ready = None
            except InferenceError as error:
                logger.warning("output bucket not ready yet: %s", error)
