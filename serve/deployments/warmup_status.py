"""Warm-up progress of model replicas, readable by the ingress while the replica is still starting.

A replica warms its UNet shapes inside its constructor, so Serve routes it nothing before every
shape is compiled. While the constructor runs the replica answers no calls, so it writes its
progress to Ray's key-value store (the GCS, which every Ray process already talks to) and the
ingress's readiness check reads it from there: "warming up: 3 of 8 shapes".
"""

from __future__ import annotations

import logging

logger = logging.getLogger("serve.deployments.warmup_status")

NAMESPACE = "img2img-warmup"


def _prefix(app: str, model_id: str) -> str:
    return f"{app}/{model_id}/"


class WarmupReporter:
    """Written by one replica: its progress under ``{app}/{model}/{replica}``, removed when done."""

    def __init__(self, app: str, model_id: str, replica: str) -> None:
        self._key = _prefix(app, model_id) + replica

    def __call__(self, done: int, total: int) -> None:
        self._put(f"{done}/{total}")
        logger.info("warm-up %s: %d of %d shapes", self._key, done, total)

    def clear(self) -> None:
        from ray.experimental import internal_kv

        try:
            internal_kv._internal_kv_del(self._key, namespace=NAMESPACE)
        except Exception:  # progress is advisory: never fail a replica over it
            logger.warning("could not clear warm-up progress %s", self._key, exc_info=True)

    def _put(self, value: str) -> None:
        from ray.experimental import internal_kv

        try:
            internal_kv._internal_kv_put(self._key, value, overwrite=True, namespace=NAMESPACE)
        except Exception:
            logger.warning("could not publish warm-up progress %s", self._key, exc_info=True)


def warming_replicas(app: str, model_id: str) -> list[tuple[int, int]]:
    """(done, total) of every replica of ``model_id`` in ``app`` that is warming up now."""
    from ray.experimental import internal_kv

    progress = []
    for key in internal_kv._internal_kv_list(_prefix(app, model_id), namespace=NAMESPACE):
        value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        try:
            done, total = (int(part) for part in (value or b"").decode().split("/"))
        except ValueError:
            continue
        progress.append((done, total))
    return progress


def describe(progress: list[tuple[int, int]]) -> str | None:
    """The readiness text for replicas warming up, or None when none is."""
    if not progress:
        return None
    parts = [f"{done} of {total} shapes" for done, total in sorted(progress)]
    return "warming up: " + ", ".join(parts)
