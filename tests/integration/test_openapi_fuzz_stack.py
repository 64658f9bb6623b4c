"""The OpenAPI fuzzer over real HTTP: Ray Serve's proxy, two ingress replicas, the tiny model, S3.

The in-process run (tests/unit/test_openapi_fuzz.py) explores widely; this one is small and bounded
(``FUZZ_EXAMPLES``, default 8 per operation) and proves the same promises hold through the parts a
fake cannot stand in for: the proxy, Ray's error paths, real storage and real generation (positive
bodies get a real image, with costly integers capped so a run stays within seconds).
"""

from __future__ import annotations

import httpx
import schemathesis

from serve.api.app import create_app
from tests.integration.conftest import wait_until_ready
from tests.support.openapi_fuzz import EXCLUDED_CHECKS, authorise, fuzz_settings, with_real_image

CAPS = {"steps": 4, "num_images": 1, "batch_size": 1, "n": 1, "width": 64, "height": 64}


#: The document the ingress serves is create_app's; it is loaded here so cases exist at collection
#: time, and the first test proves the live stack serves exactly this contract.
schema = schemathesis.openapi.from_dict(create_app().openapi())


def test_the_live_stack_serves_the_fuzzed_document(stack):
    wait_until_ready(stack)
    assert httpx.get(f"{stack.base_url}/openapi.json", timeout=30).json() == schema.raw_schema


@schema.parametrize()
@fuzz_settings(8)
def test_every_endpoint_of_the_live_stack_answers_within_its_schema(case, stack):
    authorise(case, stack.headers)
    with_real_image(case, ["tiny-sd"], CAPS)
    response = case.call_and_validate(base_url=stack.base_url, excluded_checks=EXCLUDED_CHECKS, timeout=120)
    assert response.status_code < 500, response.text
