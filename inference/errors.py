"""Error classes that cross process boundaries (Ray pickles them between replicas).

Two roots decide who is at fault: ``InvalidInputError`` means the caller sent something we will not
process (the serving layer answers 4xx), ``GenerationError`` means we failed on valid input (5xx).
Every error carries a stable machine-readable ``code``, a human ``message`` and, where one exists, the
offending ``param`` so API layers can render their own error shapes without parsing text.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[PicklableError], state: dict[str, Any]) -> PicklableError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class PicklableError(Exception):
    """An error with keyword-only fields (``message``, ``details``, ...) that survives pickle, as Ray
    needs between replicas (exceptions with keyword-only constructors do not by default)."""

    message: str
    details: str | None

    def __reduce__(self):
        return (_rebuild, (type(self), dict(self.__dict__)))

    def __str__(self) -> str:
        return self.message if not self.details else f"{self.message} ({self.details})"


class InferenceError(PicklableError):
    """Base of every error this package raises on purpose."""

    code = "inference_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        value: Any = None,
        details: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.param = param
        self.value = value
        self.details = details


class InvalidInputError(InferenceError):
    """The request cannot be served as sent; the caller must change it."""

    code = "invalid_request"


class InvalidImageError(InvalidInputError):
    """The source image is unreadable, truncated, or in a format we do not accept."""

    code = "invalid_image"


class ImageTooLargeError(InvalidInputError):
    """The encoded source image exceeds the byte limit (HTTP 413 in the REST API)."""

    code = "image_too_large"


class ImageDimensionsError(InvalidInputError):
    """The source image's pixel dimensions exceed the limit, or it is a decompression bomb."""

    code = "image_dimensions_too_large"


class UnknownModelError(InvalidInputError):
    """The requested model id is not in the registry; the message lists the known ids."""

    code = "model_not_found"


class RequestCancelledError(InferenceError):
    """The request was cancelled before it finished; its samples left the engine."""

    code = "canceled"


class GenerationError(InferenceError):
    """We failed to generate images for a valid request (a server-side fault)."""

    code = "generation_failed"


class OutOfMemoryError(GenerationError):
    """The accelerator ran out of memory for this request even after the engine split its batch."""

    code = "out_of_memory"


class ModelLoadError(GenerationError):
    """The model's weights could not be loaded (a missing folder, an unknown hub id, a broken file)."""

    code = "model_load_failed"
