"""Image fuzzing over HTTP: every odd or hostile image, sent to each image API as its clients send it.

The catalogue (tests/support/image_samples.py) holds images the service must accept (CMYK, 16-bit,
alpha, palette, EXIF-rotated, animated, ...) and images it must refuse (truncated, corrupt, huge,
decompression bombs, foreign formats). Accepted ones must reach the model as 8-bit RGB of the right
(oriented) size and come back as an image; refused ones must get a 4xx in the API's own envelope,
never a 500, and never reach the model.
"""

from __future__ import annotations

import base64

import pytest

from inference.images import output_size
from tests.support.image_samples import ACCEPTED, REFUSED
from tests.unit.api_fakes import AUTH, assert_error

API_IMAGE_CODES = {
    "rest": {"invalid_image", "image_dimensions_too_large", "image_too_large"},
    "node": {"source_image_error"},
    "openai": {"invalid_image", "image_dimensions_too_large", "image_too_large"},
}


def _data_url(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def send(client, api: str, data: bytes):
    """The image as each API's clients send it: a data URL in JSON, or a multipart file upload."""
    if api == "rest":
        return client.post("/v1/image-to-image", json={"image": _data_url(data), "prompt": "p"}, headers=AUTH)
    if api == "node":
        body = {"source_image": _data_url(data), "prompt": "p", "negative_prompt": ""}
        return client.post("/v1/nodes/image_to_image", json=body, headers=AUTH)
    files = {"image": ("upload.bin", data, "application/octet-stream")}
    return client.post("/v1/images/edits", data={"prompt": "p"}, files=files, headers=AUTH)


@pytest.mark.parametrize("api", ["rest", "node", "openai"])
@pytest.mark.parametrize("name", ACCEPTED)
def test_odd_but_valid_images_reach_the_model_as_rgb_of_the_oriented_size(client, backend, api, name):
    data, (width, height) = ACCEPTED[name]
    response = send(client, api, data)
    assert response.status_code == 200, response.text
    request = backend.last
    assert request.image.mode == "RGB"
    assert request.image.size == output_size(width, height, 0, 0, 2048)
    body = response.json()
    images = body.get("images") or body.get("data")
    assert len(images) == 1


@pytest.mark.parametrize("api", ["rest", "node", "openai"])
@pytest.mark.parametrize("name", REFUSED)
def test_broken_or_hostile_images_are_a_4xx_in_the_apis_envelope(client, backend, api, name):
    data, status = REFUSED[name]
    response = send(client, api, data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] in API_IMAGE_CODES[api], error
    if api == "openai":
        assert error["type"] == "invalid_request_error" and error["param"] == "image"
    else:
        assert_error(response, status, error["code"])
    assert not backend.calls, "a refused image reached the model"
