"""FastAPI dependencies shared by the API routers: the generation service, the job machinery and the
caller's tenant, all read from ``app.state`` (filled by ``serve.wiring`` or, in tests, by fakes)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Header, Request

from serve.generation.service import GenerationService
from serve.jobs.previews import PreviewFollowers
from serve.jobs.records import JobStore
from serve.jobs.submission import Coordinator, Submissions


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_tenant(request: Request) -> str:
    return request.app.state.tenants.tenant_for(request.headers.get("authorization"))


def get_coordinator(request: Request) -> Coordinator:
    """The job coordinator (a Ray handle adapter in production, an in-process JobRunner in tests)."""
    return request.app.state.jobs


def get_submissions(request: Request) -> Submissions:
    state = request.app.state
    return Submissions(state.service, state.jobs, state.job_store)


def get_preview_followers(request: Request) -> PreviewFollowers:
    """How event streams follow running jobs' previews (set by the ingress; by default the coordinator)."""
    followers = getattr(request.app.state, "previews", None)
    return followers if followers is not None else PreviewFollowers(request.app.state.jobs)


def get_job_store(request: Request) -> JobStore:
    return request.app.state.job_store


def get_model_aliases(request: Request) -> dict[str, str]:
    """OpenAI client names → served model ids (``openai.model_aliases``; none unless configured)."""
    return getattr(request.app.state, "model_aliases", {})


def get_priority(
    x_priority: Annotated[
        Literal["low", "normal", "high"] | None,
        Header(description="lower this call's admission lane below the plan's (never above it)"),
    ] = None,
) -> str | None:
    return x_priority


ServiceDep = Annotated[GenerationService, Depends(get_service)]
PriorityDep = Annotated[str | None, Depends(get_priority)]
ModelAliasesDep = Annotated[dict[str, str], Depends(get_model_aliases)]
CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]
SubmissionsDep = Annotated[Submissions, Depends(get_submissions)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
PreviewsDep = Annotated[PreviewFollowers, Depends(get_preview_followers)]
TenantDep = Annotated[str, Depends(get_tenant)]
