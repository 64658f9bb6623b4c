"""Errors map to HTTP by class, in one table per wire dialect; no code string decides a status."""

from __future__ import annotations

import pickle

import pytest

from inference.errors import (
    GenerationError,
    ImageTooLargeError,
    InferenceError,
    InvalidImageError,
    InvalidInputError,
    ModelLoadError,
    OutOfMemoryError,
)
from serve.api import node, openai, rest_v1
from serve.errors import (
    AuthError,
    IdempotencyConflictError,
    ModelUnavailableError,
    OverloadedError,
    PlanLimitError,
    RateLimitedError,
    ServerFault,
    ServingError,
    StorageUnavailableError,
)
from serve.outbound.fetch import SourceFetchError

DIALECTS = {"rest": rest_v1.DIALECT, "node": node.DIALECT, "openai": openai.DIALECT}


@pytest.mark.parametrize(
    "error_type", [AuthError, RateLimitedError, IdempotencyConflictError, PlanLimitError, OverloadedError]
)
def test_serving_errors_are_not_the_inference_packages(error_type):
    assert issubclass(error_type, ServingError) and not issubclass(error_type, InferenceError)


@pytest.mark.parametrize(
    ("error", "codes", "status"),
    [
        (AuthError("no key"), ("unauthorized", "invalid_connection", "invalid_api_key"), 401),
        (SourceFetchError("HTTP 404"), ("invalid_image", "source_image_error", "invalid_image"), 400),
        (ImageTooLargeError("big"), ("image_too_large", "source_image_error", "image_too_large"), 413),
        (
            PlanLimitError("3 > 2", param="num_images"),
            ("invalid_parameter", "batch_size_exceeded", "invalid_value"),
            400,
        ),
        (
            RateLimitedError("slow down", retry_after_s=2.2),
            ("rate_limited", "rate_limited", "rate_limit_exceeded"),
            429,
        ),
        (OutOfMemoryError("oom"), ("out_of_memory", "generation_failed", "out_of_memory"), 500),
        (StorageUnavailableError("s3 down"), ("storage_unavailable",) * 3, 503),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_each_dialect_has_its_own_code_for_one_class_and_the_same_status(error, codes, status):
    for name, code in zip(DIALECTS, codes, strict=True):
        translated = DIALECTS[name].translate(error)
        assert (translated.status, translated.code) == (status, code), name


def test_a_new_error_class_gets_its_status_and_retry_from_the_class_not_its_code():
    class QuotaStoreDown(ServerFault):
        code = "quota_store_down"  # in no table anywhere
        status = 503
        default_retry_after_s = 7
        public_message = "quotas are unavailable; retry shortly"

    translated = rest_v1.DIALECT.translate(QuotaStoreDown("redis at 10.0.0.5:6379 refused"))
    assert (translated.status, translated.headers["Retry-After"]) == (503, "7")
    assert translated.message == "quotas are unavailable; retry shortly"  # never the internal text
    assert "10.0.0.5" not in translated.message


def test_an_inference_error_with_a_foreign_code_keeps_its_class_status():
    assert rest_v1.DIALECT.translate(GenerationError("x", code="overloaded")).status == 500
    assert rest_v1.DIALECT.translate(InvalidInputError("x", code="timeout")).status == 400
    assert (
        rest_v1.DIALECT.translate(ModelLoadError("x")).message == "the model could not be loaded; retry later"
    )


def test_parameter_names_are_each_apis_own():
    error = InvalidImageError("unreadable", param="image")
    assert [d.translate(error).param for d in DIALECTS.values()] == ["image", "source_image", "image"]
    limit = PlanLimitError("at most 2", param="num_images")
    assert [d.translate(limit).param for d in DIALECTS.values()] == ["num_images", "batch_size", "n"]


@pytest.mark.parametrize(
    "error",
    [RateLimitedError("x", retry_after_s=3, param="p"), ModelUnavailableError("gone", details="actor died")],
)
def test_serving_errors_survive_pickle_as_ray_moves_them(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.__dict__ == error.__dict__ and str(copy) == str(error)
