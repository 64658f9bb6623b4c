"""``build_app(args)``: the Serve application builder that every Serve config points at.

``import_path: serve.app:build_app`` with ``args`` = ``AppArgs``. One ingress deployment (CPU,
autoscaled) and one model deployment per configured model (``num_gpus``/``num_cpus`` from config,
autoscaled around the engine's cap, bounded queues). The engine knobs travel as ``user_config``, so
a Serve config deploy that changes only a model deployment's ``user_config`` (its ``deployments:``
override) reaches ``ModelWorker.reconfigure`` without restarting the replica. Changing ``args``
(including ``models[].engine``) is a new application version: Serve replaces the replicas.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve import Application

from serve.config import AppArgs, ModelDeployment
from serve.deployments.coordinator import JobCoordinator
from serve.deployments.governor import GovernorDeployment
from serve.deployments.ingress import Ingress
from serve.deployments.model_worker import ModelWorker


def _model_deployment(model: ModelDeployment) -> Application:
    actor_options: dict[str, Any] = {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus}
    if model.resources:
        actor_options["resources"] = dict(model.resources)
    deployment = serve.deployment(ModelWorker).options(
        name=model.deployment_name,
        ray_actor_options=actor_options,
        autoscaling_config=model.scaling.serve_config(),
        max_ongoing_requests=model.ongoing_limit,
        max_queued_requests=model.max_queued_requests,
        user_config=asdict(model.engine_config),  # the engine config's one way in (reconfigure)
        health_check_timeout_s=model.health_check_timeout_s,
        graceful_shutdown_timeout_s=model.graceful_shutdown_timeout_s,
    )
    return deployment.bind(model.spec, model.torch_threads, model.optimize)


def build_app(args: dict[str, Any]) -> Application:
    """Validate ``args`` (errors name the bad field) and wire ingress → model deployments.

    The only validation of ``args``: every deployment receives the validated ``AppArgs`` itself."""
    parsed = AppArgs.model_validate(args)
    handles = {model.spec["id"]: _model_deployment(model) for model in parsed.models}

    def single(cls, name: str):
        """A coordination deployment: one replica that only awaits; Serve restarts it if it dies."""
        return serve.deployment(cls).options(
            name=name,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0.1},
            max_ongoing_requests=1000,
        )

    if parsed.control_plane.kind == "redis":
        # Limits live in Redis (checked from each ingress replica) and each job is held by a lease,
        # so coordinators scale out like the ingress.
        governor = None
        coordinator = (
            serve.deployment(JobCoordinator)
            .options(
                name="JobCoordinator",
                ray_actor_options={"num_cpus": 0.1},
                autoscaling_config=parsed.control_plane.coordinators.serve_config(),
                max_ongoing_requests=1000,
            )
            .bind(parsed, handles, governor)
        )
    else:
        governor = single(GovernorDeployment, "TenantGovernor").bind(parsed)
        # One coordinator owns durable jobs, so idempotency claims and cancellations stay race-free.
        coordinator = single(JobCoordinator, "JobCoordinator").bind(parsed, handles, governor)
    ingress = serve.deployment(Ingress).options(
        name="Ingress",
        ray_actor_options={"num_cpus": parsed.ingress.num_cpus},
        autoscaling_config=parsed.ingress.scaling.serve_config(),
        max_ongoing_requests=parsed.ingress.max_ongoing_requests,
        max_queued_requests=parsed.ingress.max_queued_requests,
    )
    return ingress.bind(parsed, handles, coordinator, governor)
