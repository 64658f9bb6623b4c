"""FastAPI dependencies shared by the API routers: the generation service and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve.generation import GenerationService


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_tenant(request: Request) -> str:
    return request.app.state.api_keys.tenant_for(request.headers.get("authorization"))


ServiceDep = Annotated[GenerationService, Depends(get_service)]
TenantDep = Annotated[str, Depends(get_tenant)]
