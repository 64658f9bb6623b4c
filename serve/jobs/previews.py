"""Previews of running jobs, from the coordinator that runs a job to the ``/events`` streams that show it.

The engine makes a preview of each image every k steps (``inference.previews``); the coordinator
receives them with the job's progress. They are never stored, and they cannot travel in the job
record (that is storage, and written once a second at most). So the coordinator keeps only the
newest preview of each image of each job it runs, in memory, until the job ends, and:

* local control plane (one coordinator): ``LocalPreviewBoard``; an ingress asks the coordinator for
  a job's newest previews over its handle (``JobRunner.latest_previews``): ``CoordinatorFollower``;
* Redis control plane (any of several coordinators runs a job): ``RedisPreviewBoard`` also publishes
  each preview on the job's Redis channel, and the ingress streaming the job subscribes to it:
  ``RedisFollower``. Pub/sub keeps nothing: a preview nobody listens for is gone.

A preview frame is a small JSON object with the image as a JPEG data URL; previews are best effort
(a lost one is replaced k steps later), so failures here are logged and never fail a job or a stream.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, Protocol

from redis.asyncio import Redis

from inference.images import encode_image
from inference.types import Preview

logger = logging.getLogger(__name__)

PREVIEW_QUALITY = 80  # JPEG quality of a preview: ~5-15 KB for the 256-pixel bound


def channel(tenant: str, job_id: str) -> str:
    return f"img2img:previews:{tenant}:{job_id}"


def preview_frame(job_id: str, preview: Preview) -> dict[str, Any]:
    """The ``preview`` event's body: which image, how far along, and the picture as a data URL."""
    data = encode_image(preview.image, "jpeg", quality=PREVIEW_QUALITY)
    return {
        "id": job_id,
        "image_index": preview.image_index,
        "step": preview.step,
        "steps": preview.steps,
        "width": preview.image.width,
        "height": preview.image.height,
        "image": "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"),
    }


class PreviewBoard(Protocol):
    """The coordinator's side: where a running job's previews go."""

    async def publish(self, tenant: str, job_id: str, frame: dict[str, Any]) -> None: ...

    def finish(self, tenant: str, job_id: str) -> None: ...

    def newest(self, tenant: str, job_id: str) -> list[dict[str, Any]]: ...


class LocalPreviewBoard:
    """The newest frame per image of each running job, in this process's memory only."""

    def __init__(self) -> None:
        self._frames: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}

    async def publish(self, tenant: str, job_id: str, frame: dict[str, Any]) -> None:
        self._frames.setdefault((tenant, job_id), {})[frame["image_index"]] = frame

    def finish(self, tenant: str, job_id: str) -> None:
        self._frames.pop((tenant, job_id), None)

    def newest(self, tenant: str, job_id: str) -> list[dict[str, Any]]:
        return list(self._frames.get((tenant, job_id), {}).values())


class RedisPreviewBoard(LocalPreviewBoard):
    """Keeps the newest frames like the local board and publishes each on the job's channel."""

    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self._redis = redis

    async def publish(self, tenant: str, job_id: str, frame: dict[str, Any]) -> None:
        await super().publish(tenant, job_id, frame)
        await self._redis.publish(channel(tenant, job_id), json.dumps(frame))


class PreviewFollower(Protocol):
    """The ingress's side, one per event stream: ``open`` when the stream opens (a channel must be
    listened to before the job publishes), then the frames that arrived since the last ``take``."""

    async def open(self) -> None: ...

    async def take(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class _Unseen:
    """Drops frames already handed out (a board answers with its newest frames each time)."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, int]] = set()

    def __call__(self, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fresh = [f for f in frames if (f["image_index"], f["step"]) not in self._seen]
        self._seen.update((f["image_index"], f["step"]) for f in fresh)
        return fresh


class CoordinatorFollower:
    """Asks the one coordinator (its handle, or an in-process runner) for the job's newest frames."""

    def __init__(self, coordinator, tenant: str, job_id: str) -> None:
        self._coordinator, self._tenant, self._job_id = coordinator, tenant, job_id
        self._unseen = _Unseen()

    async def open(self) -> None:
        return None

    async def take(self) -> list[dict[str, Any]]:
        return self._unseen(await self._coordinator.latest_previews(self._tenant, self._job_id))

    async def close(self) -> None:
        return None


class RedisFollower:
    """Subscribes to the job's channel for the life of one event stream."""

    def __init__(self, redis: Redis, tenant: str, job_id: str) -> None:
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._channel = channel(tenant, job_id)
        self._unseen = _Unseen()

    async def open(self) -> None:
        await self._pubsub.subscribe(self._channel)

    async def take(self) -> list[dict[str, Any]]:
        if not self._pubsub.subscribed:
            await self.open()
        newest: dict[int, dict[str, Any]] = {}
        while (message := await self._pubsub.get_message(timeout=0)) is not None:
            frame = json.loads(message["data"])
            newest[frame["image_index"]] = frame  # a slow reader skips to the newest per image
        return self._unseen(list(newest.values()))

    async def close(self) -> None:
        await self._pubsub.aclose()


class PreviewFollowers:
    """Makes the follower that fits the control plane: Redis channels, or the one coordinator."""

    def __init__(self, coordinator, redis: Redis | None = None) -> None:
        self._coordinator, self._redis = coordinator, redis

    def follow(self, tenant: str, job_id: str) -> PreviewFollower:
        if self._redis is not None:
            return RedisFollower(self._redis, tenant, job_id)
        return CoordinatorFollower(self._coordinator, tenant, job_id)
