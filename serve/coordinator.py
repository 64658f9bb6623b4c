"""The job coordinator deployment: one replica hosting the ``JobRunner`` for every ingress replica.

It restarts unfinished jobs from the store when it starts (and Serve restarts it if it dies), so a
job accepted by any ingress replica survives that replica, and this one.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve.backend import build_service
from serve.config import AppArgs, Secrets
from serve.job_runner import JobRunner
from serve.jobs import JobRecord, JobStore
from serve.webhooks import WebhookPolicy

logger = logging.getLogger("serve.coordinator")


class JobCoordinator:
    """Ray Serve deployment class (wrapped by ``serve.deployment`` in ``serve.app``)."""

    def __init__(self, args: dict[str, Any], model_handles: dict[str, DeploymentHandle]) -> None:
        parsed = AppArgs.model_validate(args)
        secrets = Secrets()
        service = build_service(parsed, secrets, model_handles)
        self._runner = JobRunner(
            service,
            JobStore(service.store),
            webhook_secret=secrets.webhook_secret.encode() if secrets.webhook_secret else None,
            webhook_policy=WebhookPolicy(**parsed.webhooks.model_dump()),
            fetch_policy=service.fetch_policy,
        )

    async def accept(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> str:
        return await self._runner.accept(record, idempotency)

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        return await self._runner.cancel(tenant, job_id)

    async def wait(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord | None:
        return await self._runner.wait(tenant, job_id, timeout_s)

    async def check_health(self) -> None:
        """Serve calls this every few seconds: the first call resumes unfinished jobs (storage permitting)."""
        try:
            await self._runner.resume()
        except Exception as error:  # storage down: the next health check tries again
            logger.warning("could not resume jobs yet: %s", error)
