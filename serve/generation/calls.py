"""One API call through the generation service: as received, as prepared, as completed.

Why "call" and not "job": a job is the durable record of an asynchronous or idempotent call
(``serve.jobs``); every call, synchronous ones included, is a ``GenerationCall``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from inference.images import SourceImage
from inference.models import ModelSpec
from inference.types import GenerationParams
from serve.storage.objects import new_job_id
from serve.tenancy.tenants import Prices


@dataclass(frozen=True)
class GenerationCall:
    """One API call: who asks, for which model, from which source, what to generate, how to store it.

    ``params`` was built by the API that received the call, with that API's defaults applied; a
    parameter left ``None`` is resolved from the model when the call is prepared.
    ``explicitly_set`` names the parameters the caller really chose (only those draw warnings)."""

    tenant: str
    image: str
    params: GenerationParams
    model: str | None = None
    output_format: str = "png"
    explicitly_set: frozenset[str] = frozenset()
    priority: str | None = None  # the lane the caller asked for (low/normal/high); the plan caps it
    id: str = field(default_factory=new_job_id)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def source_is_url(self) -> bool:
        return self.image.strip().lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class StoredImage:
    url: str
    width: int
    height: int
    key: str | None = None  # the object key in our store; None for an echoed external URL


@dataclass(frozen=True)
class PreparedCall:
    """A call whose model is known, whose source image is decoded and validated, and whose every
    parameter is concrete (seed drawn, guidance resolved from the model).

    Everything that can be the caller's fault has been checked by now, so an API can answer 202 for an
    asynchronous job with confidence. ``source_key`` is set once the source bytes are in the store.
    """

    call: GenerationCall
    model: ModelSpec
    source: SourceImage
    source_bytes: bytes
    source_key: str | None = None


@dataclass(frozen=True)
class CompletedCall:
    call: GenerationCall
    model: ModelSpec
    source: StoredImage
    images: tuple[StoredImage, ...]
    completed_at: datetime
    warnings: tuple[str, ...]
    queue_wait_s: float
    run_s: float
    unet_steps: int = 0
    compute_s: float = 0.0

    @property
    def params(self) -> GenerationParams:
        return self.call.params

    def usage(self) -> dict[str, float]:
        """What this call counts toward its tenant's usage."""
        return {
            "requests": 1,
            "images": len(self.images),
            "steps": self.unet_steps,
            "compute_seconds": self.compute_s,
        }

    def usage_report(self, prices: Prices | None) -> dict[str, Any]:
        """What the caller is shown: images, denoising steps, model-seconds (this call's measured share
        of the batched model calls it joined) and, when the plan has prices, what it cost."""
        return usage_report(self.usage(), prices)


def usage_report(usage: Mapping[str, float], prices: Prices | None) -> dict[str, Any]:
    """The public figures of a call's (or a period's) usage, the same shape everywhere."""
    report: dict[str, Any] = {
        "images": int(usage.get("images", 0)),
        "steps": int(usage.get("steps", 0)),
        "model_seconds": round(float(usage.get("compute_seconds", 0.0)), 6),
    }
    if prices is not None:
        report["cost"] = prices.cost(usage)
    return report
