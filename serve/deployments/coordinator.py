"""Coordination deployments, one replica each: the job coordinator and the tenant governor.

It restarts unfinished jobs from the store when it starts (and Serve restarts it if it dies), so a
job accepted by any ingress replica survives that replica, and this one.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from ray.serve.handle import DeploymentHandle

from inference.images import SourceImage
from serve.config import AppArgs, Secrets, build_store, configured_tenants
from serve.deployments.handles import build_service
from serve.jobs.records import JobRecord, JobStore
from serve.jobs.runner import JobRunner
from serve.jobs.webhooks import WebhookPolicy
from serve.observability.log_redaction import redact_library_logs
from serve.tenancy.governor import Limits, TenantGovernor
from serve.tenancy.tenants import TenantCatalog, TenantStore

logger = logging.getLogger("serve.deployments.coordinator")


class JobCoordinator:
    """Ray Serve deployment class (wrapped by ``serve.deployment`` in ``serve.app``)."""

    def __init__(
        self, args: dict[str, Any], model_handles: dict[str, DeploymentHandle], governor: DeploymentHandle
    ) -> None:
        redact_library_logs()  # webhook targets are callers' URLs, maybe with tokens in the query
        parsed = AppArgs.model_validate(args)
        secrets = Secrets()
        store = build_store(parsed, secrets)
        self._tenants = TenantCatalog(configured_tenants(parsed, secrets), TenantStore(store))
        service = build_service(parsed, secrets, model_handles, governor, self._tenants.lookup, store)
        webhook_secret = (
            secrets.webhook_secret.get_secret_value().encode() if secrets.webhook_secret else None
        )
        self._runner = JobRunner(
            service,
            JobStore(service.store),
            webhook_secret=webhook_secret,
            webhook_shared_secret=parsed.webhooks.shared_secret,
            tenant_lookup=self._tenants.lookup,
            webhook_policy=WebhookPolicy(
                **parsed.webhooks.model_dump(exclude={"allow_plain_http", "shared_secret"})
            ),
            fetch_policy=service.fetch_policy,
        )

    async def accept(
        self,
        record: JobRecord,
        idempotency: tuple[str, str] | None = None,
        source: SourceImage | None = None,
    ) -> str:
        return await self._runner.accept(record, idempotency, source)

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        return await self._runner.cancel(tenant, job_id)

    async def wait(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord | None:
        return await self._runner.wait(tenant, job_id, timeout_s)

    async def check_health(self) -> None:
        """Serve calls this every few seconds: the first call resumes unfinished jobs (storage permitting)."""
        try:
            await self._tenants.refresh()
            await self._runner.resume()
        except Exception as error:  # storage down: the next health check tries again
            logger.warning("could not resume jobs yet: %s", error)


class GovernorDeployment:
    """Ray Serve deployment hosting the one ``TenantGovernor`` (limits and usage for all replicas)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from serve.observability.metrics import TenantMetrics

        parsed = AppArgs.model_validate(args)
        self._governor = TenantGovernor(store=build_store(parsed, Secrets()), metrics=TenantMetrics())

    async def admit(self, tenant: str, request_id: str, images: int, limits: Limits) -> None:
        self._governor.admit(tenant, request_id, images, limits)

    async def release(self, tenant: str, request_id: str, usage: dict[str, float] | None) -> None:
        self._governor.release(tenant, request_id, usage)

    async def usage(self, tenant: str, start: datetime, end: datetime) -> dict[str, float]:
        return await self._governor.usage(tenant, start, end)

    async def check_health(self) -> None:
        """Every few seconds: persist usage that changed (storage errors are retried next time)."""
        try:
            await self._governor.flush()
        except Exception as error:
            logger.warning("could not persist usage yet: %s", error)
