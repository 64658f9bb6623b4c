"""``GET /v1/usage``: the calling tenant's metered usage over a time range (whole hours, UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from serve.api.deps import TenantDep
from serve.api.errors import ApiError

router = APIRouter(prefix="/v1", tags=["usage"])

MAX_RANGE = timedelta(days=31)


def get_usage(request: Request):
    return request.app.state.usage


@router.get("/usage")
async def usage(
    tenant: TenantDep,
    meter: Annotated[Any, Depends(get_usage)],
    start: Annotated[datetime | None, Query(description="ISO 8601; default: 24 hours ago")] = None,
    end: Annotated[datetime | None, Query(description="ISO 8601; default: now")] = None,
) -> dict[str, Any]:
    """Requests, images, denoising steps and compute seconds (share of batched UNet time)."""
    end = (end or datetime.now(UTC)).astimezone(UTC)
    start = (start or end - timedelta(hours=24)).astimezone(UTC)
    if start > end or end - start > MAX_RANGE:
        raise ApiError(400, "invalid_parameter", "start must precede end, by at most 31 days", param="start")
    totals = await meter.usage(tenant, start, end)
    return {"tenant": tenant, "start": start.isoformat(), "end": end.isoformat(), **totals}
