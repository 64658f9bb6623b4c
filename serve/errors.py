"""Server-side states the serving layer reports (Ray-free, so the HTTP layer and its tests need no Ray)."""

from __future__ import annotations

from inference.errors import GenerationError


class OverloadedError(GenerationError):
    """A bounded queue is full (Serve's max_queued_requests): 503 with Retry-After, never unbounded waits."""

    code = "overloaded"


class ModelUnavailableError(GenerationError):
    """The model replica died or is not reachable; asynchronous jobs retry on its replacement."""

    code = "model_unavailable"


class GenerationTimeoutError(GenerationError):
    """The request exceeded request_timeout_s and was canceled in the engine (504)."""

    code = "timeout"
