"""The errors the serving layer raises on purpose, each class carrying its HTTP status and retry rule.

Why a root of its own: authentication, plan limits, idempotency and the state of our own machinery
(queues, replicas, storage) are not the inference package's business, so they do not derive from
``inference.errors.InferenceError``. The HTTP layer reads ``status`` and ``retry_after_s`` from the
class (``serve.api.errors`` renders both roots; ``INFERENCE_STATUS`` below gives the inference
package's classes theirs); a durable job retries exactly the ``transient`` ones.
Ray pickles these between replicas (``PicklableError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from inference.errors import (
    GenerationError,
    ImageTooLargeError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    OutOfMemoryError,
    PicklableError,
    RequestCancelledError,
)


class ServingError(PicklableError):
    """Base of every serving-layer refusal or fault."""

    code: ClassVar[str] = "serving_error"
    status: ClassVar[int] = 400
    #: Seconds a client should wait before trying again (a ``Retry-After`` header), if it may retry.
    default_retry_after_s: ClassVar[float | None] = None
    #: A durable job is run again after this error, once the failing part answers again.
    transient: ClassVar[bool] = False
    #: What a client is told about a server fault instead of our own text (endpoints, keys, internals).
    public_message: ClassVar[str] = "the request failed on our side; retry later"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        details: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details
        self.retry_after_s = retry_after_s if retry_after_s is not None else self.default_retry_after_s


# ---- the caller must change something (4xx) ------------------------------------------------------


class AuthError(ServingError):
    """Missing, malformed or unknown API key."""

    code = "unauthorized"
    status = 401


class ModelNotAllowedError(ServingError):
    """The tenant's plan does not include this model."""

    code = "model_not_allowed"
    status = 403


class PlanLimitError(ServingError):
    """The request asks for more than the tenant's plan allows at once (e.g. images per request).

    ``param`` is the engine's name (``num_images``); each API renames it to its own field."""

    code = "plan_limit_exceeded"
    status = 400


class NotFoundError(ServingError):
    """No such resource for this tenant (another tenant's id gets the same answer)."""

    code = "not_found"
    status = 404


class IdempotencyConflictError(ServingError):
    """The Idempotency-Key was used before with a different request body."""

    code = "idempotency_conflict"
    status = 409


class RateLimitedError(ServingError):
    """The tenant is over its rate or concurrency limit; ``retry_after_s`` says when to come back."""

    code = "rate_limited"
    status = 429


# ---- our fault (5xx) ------------------------------------------------------------------------------


class ServerFault(ServingError):
    """A failure on our side: the client gets ``public_message``, never the exception's text."""

    code = "internal_error"
    status = 500


class OverloadedError(ServerFault):
    """A bounded queue is full (Serve's max_queued_requests), or the limiter cannot be reached."""

    code = "overloaded"
    status = 503
    default_retry_after_s = 2
    transient = True
    public_message = "the service is at capacity; retry shortly"


class ModelUnavailableError(ServerFault):
    """The model replica died or is not reachable; asynchronous jobs retry on its replacement."""

    code = "model_unavailable"
    status = 503
    default_retry_after_s = 10
    transient = True
    public_message = "the model is temporarily unavailable; retry shortly"


class StorageUnavailableError(ServerFault):
    """The object store could not be reached or refused us."""

    code = "storage_unavailable"
    status = 503
    default_retry_after_s = 5
    transient = True
    public_message = "object storage is temporarily unavailable; retry shortly"


class GenerationTimeoutError(ServerFault):
    """The request exceeded request_timeout_s and was canceled in the engine."""

    code = "timeout"
    status = 504
    public_message = "generation did not finish within the request timeout; the request was canceled"


class JobFailedError(ServingError):
    """A durable job the caller waited for (an idempotent synchronous call) failed: the caller gets
    the failure its job recorded, with that failure's code and HTTP status (the record keeps only
    public words, so they are safe to send as they are)."""

    def __init__(self, message: str, *, code: str, status: int, details: str | None = None) -> None:
        super().__init__(message, details=details)
        self.code, self.status, self.public_message = code, status, message

    @classmethod
    def of(cls, recorded: Any) -> JobFailedError:
        """From a job record's error (``serve.jobs.records.JobError``)."""
        return cls(recorded.message, code=recorded.code, status=recorded.status, details=recorded.details)


# ---- classification, for both roots -------------------------------------------------------------

#: What the API layer renders: a refusal or fault from either root.
Failure = InferenceError | ServingError

#: HTTP status of the inference package's errors, which know nothing of HTTP (a serving error carries
#: its own ``status``); looked up along the class's MRO, the most specific entry wins.
INFERENCE_STATUS: Mapping[type[InferenceError], int] = {
    ImageTooLargeError: 413,
    RequestCancelledError: 409,
    InvalidInputError: 400,
    InferenceError: 500,
}

#: What a client is told about an inference fault instead of its text (a replica's repr, internals).
INFERENCE_PUBLIC_MESSAGES: Mapping[type[InferenceError], str] = {
    OutOfMemoryError: "the model ran out of accelerator memory for this request; try fewer or smaller images",
    ModelLoadError: "the model could not be loaded; retry later",
    GenerationError: "image generation failed on our side; retry later",
}
GENERIC_SERVER_MESSAGE = "the request failed on our side; retry later"


def by_class(table: Mapping[type, Any], error_type: type, default: Any = None) -> Any:
    """The entry of the most specific class of ``error_type`` in ``table`` (its MRO order)."""
    for cls in error_type.__mro__:
        if cls in table:
            return table[cls]
    return default


def status_for(error: Failure) -> int:
    if isinstance(error, ServingError):
        return error.status
    return by_class(INFERENCE_STATUS, type(error), 500)


def is_server_fault(error: Failure) -> bool:
    return status_for(error) >= 500


def public_message(error: Failure) -> str:
    if isinstance(error, ServingError):
        return error.public_message
    return by_class(INFERENCE_PUBLIC_MESSAGES, type(error), GENERIC_SERVER_MESSAGE)


def public_fields(error: Failure) -> dict[str, Any]:
    """``{"code", "message", "details"}`` safe to show a client (e.g. on a failed job's record): a
    client fault keeps its own words (they describe the client's input), a server fault gets the
    stable sentence for its class."""
    if is_server_fault(error):
        return {"code": error.code, "message": public_message(error), "details": None}
    return {"code": error.code, "message": error.message, "details": error.details}
