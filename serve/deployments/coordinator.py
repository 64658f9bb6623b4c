"""The job coordinator deployment: one replica owning durable jobs, a ``JobRunner`` in a Ray shell.

It restarts unfinished jobs from the store when it starts (and Serve restarts it if it dies), so a
job accepted by any ingress replica survives that replica, and this one. Its RPCs (``accept``,
``cancel``, ``wait``) are the runner's own methods: the ingress calls them by name through
``serve.deployments.handles.coordinator_client``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.serve.handle import DeploymentHandle

from serve.api.job_views import job_renderer
from serve.config import AppArgs, Secrets
from serve.deployments.handles import RayModelBackend, governor_client
from serve.jobs.retention import RetentionSweeper
from serve.jobs.runner import JobRunner
from serve.jobs.webhooks import WebhookPolicy
from serve.observability.log_redaction import redact_library_logs
from serve.wiring import leases, preview_board, wire

logger = logging.getLogger(__name__)

RETENTION_SWEEP_INTERVAL_S = 600.0  # each sweep deletes a bounded batch; a backlog drains over several


class JobCoordinator(JobRunner):
    """Ray Serve deployment class (wrapped by ``serve.deployment`` in ``serve.app``)."""

    def __init__(
        self, args: AppArgs, model_handles: dict[str, DeploymentHandle], governor: DeploymentHandle | None
    ) -> None:
        redact_library_logs()  # webhook targets are callers' URLs, maybe with tokens in the query
        secrets = Secrets()
        backend = RayModelBackend(model_handles, args.models, args.request_timeout_s)
        wired = wire(args, secrets, backend, governor_client(governor) if governor else None)
        self._tenants = wired.tenants
        self._watcher: asyncio.Task | None = None
        self._retention = RetentionSweeper(wired.store, wired.tenants.all)
        self._next_sweep = 0.0
        webhook_secret = (
            secrets.webhook_secret.get_secret_value().encode() if secrets.webhook_secret else None
        )
        super().__init__(
            service=wired.service,
            jobs=wired.records,
            render=job_renderer(wired.store, args.storage.url_expiry_s),
            webhook_secret=webhook_secret,
            webhook_shared_secret=args.webhooks.shared_secret,
            webhook_policy=WebhookPolicy(
                **args.webhooks.model_dump(exclude={"allow_plain_http", "shared_secret"})
            ),
            fetch_policy=wired.service.fetch_policy,
            tenant_lookup=wired.tenants.lookup,
            leases=leases(args, wired),
            previews=preview_board(wired),
            preview_every=args.previews.job_every_steps,
        )

    async def check_health(self) -> None:
        """Serve calls this every few seconds: the first call resumes unfinished jobs (storage
        permitting) and, when coordinators share jobs, starts the scan for orphaned ones."""
        try:
            await self._tenants.refresh()
            await self.resume()
        except Exception as error:  # storage down: the next health check tries again
            logger.warning("could not resume jobs yet: %s", error)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + RETENTION_SWEEP_INTERVAL_S
            try:
                await self._retention.sweep()
            except Exception as error:  # storage down: the next interval tries again
                logger.warning("retention sweep failed: %s", error)
        if self.leases.shared and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self.watch_orphans())
