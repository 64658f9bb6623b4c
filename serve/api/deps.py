"""FastAPI dependencies shared by the API routers: the generation service and the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from serve.generation.service import GenerationService
from serve.jobs.records import JobStore


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_tenant(request: Request) -> str:
    return request.app.state.tenants.tenant_for(request.headers.get("authorization"))


def get_jobs(request: Request):
    """The job coordinator (a Ray handle adapter in production, an in-process JobRunner in tests)."""
    return request.app.state.jobs


def get_job_store(request: Request) -> JobStore:
    return request.app.state.job_store


ServiceDep = Annotated[GenerationService, Depends(get_service)]
JobsDep = Annotated[Any, Depends(get_jobs)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
TenantDep = Annotated[str, Depends(get_tenant)]


def explicit_choices(body: BaseModel) -> frozenset[str]:
    """Fields the caller set to something other than null or the default: only these can draw an
    'ignored by this model' warning (clients that always send every field must not get warnings)."""
    fields = type(body).model_fields
    return frozenset(
        name
        for name in body.model_fields_set
        if getattr(body, name) is not None and getattr(body, name) != fields[name].default
    )
