"""One typed error body for every API, how each error class maps to HTTP, and the dialect type.

Nothing here dispatches on code strings: the HTTP status, Retry-After and public message come from
the error's class (``serve.errors``). Each wire dialect (REST, node, OpenAI) is one
``Dialect`` in its API module: a table from error class to that API's code, and from our parameter
names to its field names, so every error names the caller's own field in the caller's own codes.
The envelope of REST and node is ``{"error": {"code", "message", "details", "param"}}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from inference.errors import InvalidInputError
from serve.errors import Failure, by_class, public_message, status_for


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


@dataclass(frozen=True)
class Dialect:
    """One API's error vocabulary, as tables (subclasses add how that API reports schema errors).

    * ``codes``: error class → this API's code, looked up along the MRO; absent: the error's own code;
    * ``params``: our parameter name → this API's field name (``num_images`` → ``batch_size``);
    * ``field_codes``: for an invalid input on one of this API's fields, that field's code;
    * ``schema_codes``: more field codes, for schema (type and range) errors only.
    """

    codes: Mapping[type[Exception], str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    field_codes: Mapping[str, str] = field(default_factory=dict)
    schema_codes: Mapping[str, str] = field(default_factory=dict)

    def param(self, error: Failure) -> str | None:
        return self.params.get(error.param, error.param) if error.param is not None else None

    def code(self, error: Failure) -> str:
        code = by_class(self.codes, type(error))
        if code is not None:
            return code
        if isinstance(error, InvalidInputError):
            return self.field_codes.get(self.param(error) or "", error.code)
        return error.code

    def translate(self, error: Failure) -> ApiError:
        """The error in this API's terms. A server fault keeps its status but never its text (see
        ``public_message``); the caller logs the original once (``serve.api.app`` does for every API)."""
        status = status_for(error)
        retry = getattr(error, "retry_after_s", None)
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else {}
        if status >= 500:
            return ApiError(status, self.code(error), public_message(error), None, None, headers)
        param = self.param(error)
        details = error.details
        if details is None and param is not None:
            details = f"parameter: {param}"
        return ApiError(status, self.code(error), error.message, details, param, headers)

    def validation(self, errors: Sequence[Mapping[str, Any]]) -> ApiError:
        """A request that failed schema validation (FastAPI's 422), as this API's 400."""
        param, message, details = validation_summary(errors)
        codes = {**self.field_codes, **self.schema_codes}
        code = "invalid_request" if param == "body" else codes.get(param, "invalid_parameter")
        return ApiError(400, code, message, details, param)

    def render(self, error: ApiError) -> JSONResponse:
        return error.response()
