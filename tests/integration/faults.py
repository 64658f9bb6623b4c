"""Fault injection on the running stack: kill Serve replicas the way a crashed process dies."""

from __future__ import annotations


def _marker(deployment: str, app: str) -> str:
    return f"{app}#{deployment}#"  # replica actors are named SERVE_REPLICA::<app>#<deployment>#<id>


def kill_replicas(deployment: str, app: str = "img2img") -> list[str]:
    """Kill every live replica of ``deployment`` (no restart by Ray: Serve must notice and replace
    it, as after a crash or a lost node). Returns the killed actors' names."""
    import ray

    marker = _marker(deployment, app)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if marker in a["name"]]
    assert replicas, f"no live replica of {deployment} found"
    for actor in replicas:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    return [actor["name"] for actor in replicas]


def live_replicas(deployment: str, app: str = "img2img") -> list[str]:
    import ray

    marker = _marker(deployment, app)
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if marker in a["name"]]
