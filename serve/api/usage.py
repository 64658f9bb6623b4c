"""``GET /v1/usage``: the calling tenant's metered usage over a time range (whole hours, UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BeforeValidator

from serve.api.deps import TenantDep
from serve.api.errors import ApiError, error_responses
from serve.generation.calls import usage_report

router = APIRouter(prefix="/v1", tags=["usage"], responses=error_responses())

MAX_RANGE = timedelta(days=31)


def _iso_8601(value: Any) -> datetime:
    """ISO 8601 text only: pydantic alone would also read '0.5' as seconds since 1970, which the
    documented ``date-time`` format does not allow. A time without an offset is taken as UTC, and
    years far outside any usage record are refused (found by the OpenAPI fuzzer: year 1 minus a day
    overflowed into a 500)."""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError("expected an ISO 8601 date-time such as 2026-11-21T08:00:00Z") from None
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:  # normalised here, so range arithmetic later cannot overflow at the calendar's ends
        moment = moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("date-time out of range (years 1970 to 9998)") from None
    if not 1970 <= moment.year <= 9998:
        raise ValueError("date-time out of range (years 1970 to 9998)")
    return moment


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_8601)]


def get_usage(request: Request):
    return request.app.state.usage


@router.get("/usage")
async def usage(
    request: Request,
    tenant: TenantDep,
    meter: Annotated[Any, Depends(get_usage)],
    start: Annotated[IsoDateTime | None, Query(description="ISO 8601; default: 24 hours ago")] = None,
    end: Annotated[IsoDateTime | None, Query(description="ISO 8601; default: now")] = None,
) -> dict[str, Any]:
    """Requests, images, denoising steps and compute seconds (share of batched UNet time), the same
    figures every job carries (``model_seconds`` = compute seconds) and, with plan prices, their cost."""
    end = (end or datetime.now(UTC)).astimezone(UTC)
    start = (start or end - timedelta(hours=24)).astimezone(UTC)
    if start > end or end - start > MAX_RANGE:
        raise ApiError(400, "invalid_parameter", "start must precede end, by at most 31 days", param="start")
    totals = await meter.usage(tenant, start, end)
    found = request.app.state.tenants.lookup(tenant)
    report = usage_report(totals, found.prices if found is not None else None)
    return {"tenant": tenant, "start": start.isoformat(), "end": end.isoformat(), **totals, **report}
