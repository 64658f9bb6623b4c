"""Property-based fuzzing of every documented endpoint from the app's own OpenAPI document.

schemathesis generates requests from ``/openapi.json`` (valid ones and schema-violating ones) and
checks each answer: never a 5xx, a documented status code, a documented content type, a body that
matches the documented schema for that status (our error envelopes included), an ``Allow`` header on
405s. Schema-valid requests may still be refused with a 4xx: a string can be schema-valid and not an
image, a model id can be well-formed and unknown, so ``positive_data_acceptance`` is left out.

A second pass swaps a real image into schema-valid bodies, so the fuzzed parameters reach the whole
generation path (admission, storage, the response object) instead of stopping at image decoding.

Bounded: ``FUZZ_EXAMPLES`` examples per operation (default 60; about 30 s in all here), derandomised
so CI is reproducible; ``FUZZ_RANDOM=1`` explores new inputs on each run.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import pytest
import schemathesis

from tests.support.openapi_fuzz import EXCLUDED_CHECKS, authorise, fuzz_settings, with_real_image
from tests.unit.api_fakes import AUTH, MODEL_IDS, build_app

FUZZ_SETTINGS = fuzz_settings(60)
GENERATED: collections.Counter[str] = collections.Counter()

# One app for the module: schemathesis needs the ASGI app when the module is collected.
APP = build_app(Path(tempfile.mkdtemp(prefix="openapi-fuzz-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_endpoint_answers_within_its_schema(case):
    authorise(case, AUTH)
    case.call_and_validate(excluded_checks=EXCLUDED_CHECKS)


@schema.include(method="POST").parametrize()
@FUZZ_SETTINGS
def test_fuzzed_parameters_with_a_real_image_reach_generation_and_conform(case):
    authorise(case, AUTH)
    with_real_image(case, MODEL_IDS)
    response = case.call_and_validate(excluded_checks=EXCLUDED_CHECKS)
    assert response.status_code < 500
    if response.status_code == 200 and case.operation.path != "/v1/image-to-image":
        GENERATED[case.operation.path] += 1


def test_the_real_image_pass_did_generate_images_on_every_image_route():
    """Guards the pass above against silently testing only refusals (it runs first, in file order)."""
    assert GENERATED["/v1/nodes/image_to_image"] > 0 and GENERATED["/v1/images/edits"] > 0, GENERATED
    assert len(APP.state.service.backend.calls) >= 20


def test_the_document_describes_errors_in_each_apis_envelope():
    paths = APP.openapi()["paths"]
    rest = paths["/v1/image-to-image"]["post"]["responses"]
    edits = paths["/v1/images/edits"]["post"]["responses"]
    assert {"400", "401", "413", "429", "503"} <= set(rest) and "422" not in rest
    assert rest["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    assert edits["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorEnvelope")


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_an_undeclared_method_names_every_declared_one(method):
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        response = client.request(method, "/v1/image-to-image/some-job", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    assert response.json()["error"]["code"] == "method_not_allowed"
