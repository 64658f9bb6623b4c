"""The FastAPI application: API routers, body limits, CORS and the one exception → HTTP table.

Ray-free on purpose: unit tests build it with a fake model backend; the Ray Serve ingress mounts
the same app and fills ``app.state`` in its constructor.

The interactive docs pages (``/docs``, ``/redoc``) are off on purpose: they load scripts from a
third-party CDN into pages served from the API's origin, and nothing needs them in production.
``/openapi.json`` stays: it is the contract clients and tests generate from.
"""

from __future__ import annotations

import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.errors import InferenceError
from serve.api import jobs, node, openai, rest_v1, system, usage
from serve.api.errors import ApiError, Dialect, Failure
from serve.errors import ServingError
from serve.middleware.body_limit import BodyLimitMiddleware
from serve.middleware.cors import CorsPolicy, add_cors
from serve.observability.log_redaction import redact_library_logs

logger = logging.getLogger("serve.api.app")

#: Path prefix → the API whose error vocabulary applies (first match wins).
DIALECTS: tuple[tuple[str, Dialect], ...] = (
    ("/v1/nodes/", node.DIALECT),
    ("/v1/images/", openai.DIALECT),
    ("/", rest_v1.DIALECT),
)

#: A 10 MB image is ~13.4 MB as base64; anything far beyond is refused before it is read.
MAX_BODY_BYTES = 16 * 1024 * 1024


def _dialect(request: Request) -> Dialect:
    return next(d for prefix, d in DIALECTS if request.url.path.startswith(prefix))


def _methods_for(request: Request) -> list[str]:
    """Every documented method at this path (a job's GET and DELETE are separate routes, and
    Starlette's 405 names only the first one it tried)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def _render(request: Request, error: ApiError) -> JSONResponse:
    """The error in the envelope of the API the path belongs to (a dialect may bring its own)."""
    return _dialect(request).render(error)


def _openapi_without_422(app: FastAPI):
    """FastAPI documents a 422 on every route with parameters; ours answer validation errors with a
    400 in their API's envelope instead, so the document must not promise a shape we never send."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


#: Every route under this prefix needs an API key, checked before its body is read.
AUTHENTICATED_PREFIX = "/v1/"


class UnauthenticatedBodyError(StarletteHTTPException):
    """Raised from ``receive`` when a request without a valid key is about to have its body read."""

    def __init__(self, error: ServingError) -> None:
        super().__init__(status_code=401, detail=error.message)
        self.error = error


class AuthenticateFirstMiddleware:
    """Check the API key of a ``/v1/`` request before the first byte of its body is received.

    FastAPI reads and parses a route's body (JSON, or multipart into spooled files) before it runs any
    dependency, ``TenantDep`` included: an unauthenticated 15 MB upload used to be received and parsed
    in full just to be told 401. This wraps ``receive``: its first call checks the key on the headers
    and, for a missing or unknown one, raises instead of reading; FastAPI re-raises HTTP exceptions from
    body parsing unchanged, so the app's handler answers 401 in the route's own envelope, with the route
    matched as usual (metrics, 404/405 unchanged). Routes without a body never call ``receive`` before
    their dependencies run, and ``TenantDep`` authenticates those. Innermost, so a caller without a key
    is told 401 before anything about our body limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUTHENTICATED_PREFIX):
            await self.app(scope, receive, send)
            return
        checked = False

        async def authenticated_receive() -> Message:
            nonlocal checked
            if not checked:
                tenants = getattr(scope["app"].state, "tenants", None)
                if tenants is not None:
                    try:
                        tenants.tenant_for(Headers(scope=scope).get("authorization"))
                    except ServingError as error:
                        raise UnauthenticatedBodyError(error) from None
                checked = True
            return await receive()

        await self.app(scope, authenticated_receive, send)


#: Starlette's HTTP errors → our codes (a 413 is the body limit's refusal).
HTTP_ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def create_app(max_body_bytes: int = MAX_BODY_BYTES, cors: CorsPolicy | None = None) -> FastAPI:
    redact_library_logs()
    app = FastAPI(
        title="img2img service",
        version="1",
        description="Image-to-image diffusion with step-level batching. Authenticate with 'Bearer <key>'.",
        docs_url=None,
        redoc_url=None,
    )
    for module in (rest_v1, jobs, node, openai, system, usage):
        app.include_router(module.router)
    app.openapi = _openapi_without_422(app)
    # Both wrap ``receive`` and sit inside every BaseHTTPMiddleware, so their 401/413 are raised where
    # FastAPI reads the body and render in the API's envelope (an outer BaseHTTPMiddleware would wrap
    # them in an exception group first). The key is checked first, then the body limit, then bytes flow.
    app.add_middleware(AuthenticateFirstMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def record_metrics(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # an exception escaping the handlers is answered with a 500 by Starlette
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics = getattr(request.app.state, "metrics", None)
            route = request.scope.get("route")
            if metrics is not None and route is not None:  # unmatched paths would explode label cardinality
                metrics.request_done(route.path, status, time.perf_counter() - started)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return _render(request, error)

    async def on_failure(request: Request, error: Failure) -> JSONResponse:
        translated = _dialect(request).translate(error)
        if translated.status >= 500:
            logger.warning("%s %s failed: %s (%s)", request.method, request.url.path, error.code, error)
        return _render(request, translated)

    app.add_exception_handler(InferenceError, on_failure)
    app.add_exception_handler(ServingError, on_failure)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # A bug, not a refusal: log the traceback here, never send it (Starlette re-raises it after).
        logger.error("%s %s crashed", request.method, request.url.path, exc_info=error)
        return _render(request, ApiError(500, "internal_error", "internal server error"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI parses the body before running dependencies; an unauthenticated caller must still
        # get 401, not a lesson in our schema.
        tenants = getattr(request.app.state, "tenants", None)
        if request.url.path.startswith("/v1/") and tenants is not None:
            try:
                tenants.tenant_for(request.headers.get("authorization"))
            except ServingError as auth_error:
                return _render(request, _dialect(request).translate(auth_error))
        return _render(request, _dialect(request).validation(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error, UnauthenticatedBodyError):
            return _render(request, _dialect(request).translate(error.error))
        code = HTTP_ERROR_CODES.get(error.status_code, "http_error")
        headers = dict(error.headers or {})
        if error.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(_methods_for(request))
        return _render(request, ApiError(error.status_code, code, str(error.detail), headers=headers))

    add_cors(app, cors)  # last: outermost
    return app
