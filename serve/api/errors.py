"""One typed error body for every API, and the table that decides each error's HTTP status.

Client faults derive from ``InvalidInputError`` and server faults from ``GenerationError``; the
exception's root, not its text, picks 4xx or 5xx. Each API may rename codes to its own spec's
vocabulary (the node API's ``invalid_strength``, ...) through a translator, but the envelope is the
same everywhere: ``{"error": {"code", "message", "details", "param"}}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from inference.errors import InferenceError, InvalidInputError

#: HTTP status for codes that are not a plain 400 (client) or 500 (server).
STATUS_BY_CODE: Mapping[str, int] = {
    "unauthorized": 401,
    "invalid_connection": 401,
    "forbidden": 403,
    "not_found": 404,
    "image_too_large": 413,
    "payload_too_large": 413,
    "rate_limited": 429,
    "model_not_allowed": 403,
    "canceled": 409,
    "idempotency_conflict": 409,
    "storage_unavailable": 503,
    "overloaded": 503,
    "model_unavailable": 503,
    "timeout": 504,
}


@dataclass
class ApiError(Exception):
    """An error already in API terms: rendered as-is by the app-wide handler."""

    status: int
    code: str
    message: str
    details: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "details": self.details}
        if self.param is not None:
            body["param"] = self.param
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers or None)


class ErrorBody(BaseModel):
    """What went wrong: a stable machine-readable ``code`` and a sentence for people."""

    code: str
    message: str
    details: str | None = None
    param: str | None = None


class ErrorEnvelope(BaseModel):
    """The error body of the REST and node APIs."""

    error: ErrorBody


#: What each documented error status means, for the OpenAPI document.
ERROR_STATUS_MEANINGS: Mapping[int, str] = {
    400: "Invalid request: a parameter or the source image is unusable (`param` names it)",
    401: "Missing or unknown API key",
    403: "The key may not use this model or resource",
    404: "No such resource (or not this tenant's)",
    409: "Conflict: an idempotency key reused with another body, or a canceled job",
    413: "Request body or source image too large",
    429: "Rate limit or concurrency quota exceeded; honour Retry-After",
    500: "Internal error (a bug); the body never carries a traceback",
    503: "Overloaded, model not ready or storage unavailable; honour Retry-After",
    504: "Generation did not finish within the request timeout",
}


def error_responses(envelope: type[BaseModel] = ErrorEnvelope, statuses=tuple(ERROR_STATUS_MEANINGS)) -> dict:
    """``responses=`` for a router: every error status it may send, in its API's envelope, so the
    OpenAPI document (and clients generated from it) knows the failure shapes as well as success."""
    return {status: {"model": envelope, "description": ERROR_STATUS_MEANINGS[status]} for status in statuses}


#: Seconds a client should wait before retrying, for transient server-side states.
RETRY_AFTER_S: Mapping[str, int] = {"overloaded": 2, "storage_unavailable": 5, "model_unavailable": 10}


def status_for(error: InferenceError) -> int:
    if error.code in STATUS_BY_CODE:
        return STATUS_BY_CODE[error.code]
    return 400 if isinstance(error, InvalidInputError) else 500


#: What a client is told about a server-side failure, by code. The exception's own text (S3 endpoint,
#: bucket and object key, a replica's ``repr(exception)``, Ray internals) is logged where it happens
#: and never sent: a server fault's message is one of these stable sentences, and it has no details.
PUBLIC_MESSAGES: Mapping[str, str] = {
    "storage_unavailable": "object storage is temporarily unavailable; retry shortly",
    "overloaded": "the service is at capacity; retry shortly",
    "model_unavailable": "the model is temporarily unavailable; retry shortly",
    "timeout": "generation did not finish within the request timeout; the request was canceled",
    "out_of_memory": "the model ran out of accelerator memory for this request; try fewer or smaller images",
    "model_load_failed": "the model could not be loaded; retry later",
    "generation_failed": "image generation failed on our side; retry later",
    "internal_error": "internal server error",
}
GENERIC_SERVER_MESSAGE = "the request failed on our side; retry later"


def is_server_fault(error: InferenceError) -> bool:
    return status_for(error) >= 500


def public_message(code: str) -> str:
    return PUBLIC_MESSAGES.get(code, GENERIC_SERVER_MESSAGE)


def public_fields(error: InferenceError) -> dict[str, Any]:
    """``{"code", "message", "details"}`` safe to show a client (e.g. on a failed job's record): a
    client fault keeps its own words (they describe the client's input), a server fault gets the
    stable sentence for its code."""
    if is_server_fault(error):
        return {"code": error.code, "message": public_message(error.code), "details": None}
    return {"code": error.code, "message": error.message, "details": error.details}


def api_error(error: InferenceError, rename: Callable[[InferenceError], str] | None = None) -> ApiError:
    """Translate an inference/serving error; ``rename`` maps it to an API's own code vocabulary.

    A server fault (5xx) keeps its code and status but never its text: see ``PUBLIC_MESSAGES``. The
    caller logs the original once (``serve.api.app`` does for every API)."""
    code = rename(error) if rename else error.code
    status = status_for(error)
    retry = RETRY_AFTER_S.get(error.code)
    if getattr(error, "retry_after_s", None) is not None:
        retry = max(1, math.ceil(error.retry_after_s))
    headers = {"Retry-After": str(retry)} if retry else {}
    if status >= 500:
        return ApiError(status, code, public_message(error.code), None, None, headers)
    details = error.details
    if details is None and error.param is not None and isinstance(error, InvalidInputError):
        details = f"parameter: {error.param}"
    return ApiError(status, code, error.message, details, error.param, headers)


def overloaded(
    retry_after_s: int = 1, message: str = "the service is at capacity; retry shortly"
) -> ApiError:
    return ApiError(503, "overloaded", message, headers={"Retry-After": str(retry_after_s)})


def describe_validation_error(error: Mapping[str, Any]) -> tuple[str, str]:
    """(parameter name, human message) from one pydantic error entry."""
    location = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    param = ".".join(location) or "body"
    message = error.get("msg", "invalid value")
    if error.get("type") == "missing":
        return param, f"'{param}' is required"
    if error.get("type") == "json_invalid":
        return "body", "the request body is not valid JSON"
    return param, f"'{param}': {message}"


def validation_summary(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str, str | None]:
    """(first bad parameter, its message, every problem when there is more than one)."""
    param, message = describe_validation_error(errors[0])
    details = "; ".join(describe_validation_error(e)[1] for e in errors) if len(errors) > 1 else None
    return param, message, details
