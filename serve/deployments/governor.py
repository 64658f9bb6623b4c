"""The tenant governor deployment: one replica holding every tenant's limits and usage meters.

Its RPCs (``admit``, ``release``, ``usage``) are the methods of ``LocalAdmission``, which it is; the
ingress and the coordinator call them by name through ``serve.deployments.handles.governor_client``.
"""

from __future__ import annotations

import logging

from serve.config import AppArgs, Secrets, build_store
from serve.observability.metrics import TenantMetrics
from serve.tenancy.governor import LocalAdmission, TenantGovernor

logger = logging.getLogger(__name__)


class GovernorDeployment(LocalAdmission):
    """Ray Serve deployment hosting the one ``TenantGovernor`` (limits and usage for all replicas)."""

    def __init__(self, args: AppArgs) -> None:
        super().__init__(TenantGovernor(store=build_store(args, Secrets()), metrics=TenantMetrics()))

    async def check_health(self) -> None:
        """Every few seconds: persist usage that changed (storage errors are retried next time)."""
        try:
            await self.governor.flush()
        except Exception as error:
            logger.warning("could not persist usage yet: %s", error)
