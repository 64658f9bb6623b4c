"""Routes that are not an image API: liveness, readiness, the model list, signed local files."""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from serve.api.deps import ModelAliasesDep, ServiceDep, TenantDep
from serve.api.errors import ApiError, error_responses
from serve.storage.objects import content_type_for

router = APIRouter(tags=["system"])
#: What ``/files`` may serve: the keys ``object_key`` makes for outputs (``{index}``) and stored sources
#: (``source``), images only. Anything else in the store (tenant records, job records, usage) is never
#: served, even under a valid signature.
SERVABLE_FILE_KEY = re.compile(
    r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}/\d{4}/\d{2}/\d{2}/[A-Za-z0-9._-]{1,128}/"
    r"(?:\d{1,6}|source)\.(?:png|jpg|jpeg|webp)"
)
logger = logging.getLogger("serve.readiness")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the ingress answers. Says nothing about models or storage (that is /readyz)."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    problems: dict[str, str]


_last_storage_problem: list[str | None] = [None]


def _log_storage_problem(problem: str | None) -> None:
    if problem != _last_storage_problem[0]:
        if problem is None:
            logger.warning("readiness: storage is available again")
        else:
            logger.warning("readiness: storage unavailable: %s", problem)
        _last_storage_problem[0] = problem


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A model has no running replica or storage fails"}},
)
async def readyz(service: ServiceDep) -> JSONResponse:
    """Ready when every model has a running replica and storage answers; otherwise says which part is not."""
    problems: dict[str, str] = {}
    try:
        await service.store.check()
    except Exception as error:
        # /readyz needs no key and may face the internet: name the part, keep its endpoint and
        # bucket (internal names) in the log, once per change rather than once per probe.
        problems["storage"] = "object storage is unavailable (details in the ingress log)"
        _log_storage_problem(str(error))
    else:
        _log_storage_problem(None)
    for model_id, reason in (await service.backend.readiness()).items():
        if reason is not None:
            problems[f"model:{model_id}"] = reason
    body: dict[str, Any] = {"status": "ready" if not problems else "not_ready", "problems": problems}
    return JSONResponse(body, status_code=200 if not problems else 503)


@router.get("/v1/models", responses=error_responses(statuses=(401, 500)))
async def list_models(service: ServiceDep, _: TenantDep, aliases: ModelAliasesDep) -> dict[str, Any]:
    """Every served model; ``aliases`` names the OpenAI client names that reach it."""
    return {
        "data": [
            {**spec.describe(), "aliases": sorted(a for a, target in aliases.items() if target == spec.id)}
            for spec in service.registry.specs
        ]
    }


@router.get("/files/{key:path}", include_in_schema=False)
async def local_file(key: str, expires: int, signature: str, request: Request) -> Response:
    """Serve an output of the embedded local store through its expiring signed URL."""
    if not SERVABLE_FILE_KEY.fullmatch(key):
        raise ApiError(404, "not_found", "no such file")
    store = request.app.state.service.store
    verify = getattr(store, "verify", None)
    if verify is None or not verify(key, expires, signature):
        raise ApiError(403, "forbidden", "the link is invalid or has expired")
    try:
        data = await store.get(key)
    except KeyError:
        raise ApiError(404, "not_found", "no such file") from None
    return Response(data, media_type=content_type_for(key))
