"""The image catalogue (tests/support/image_samples.py) against the real stack: Ray, the tiny model, S3.

The unit suite proves every API decodes or refuses each image; this proves the decoded odd images
really generate (the model gets a usable tensor) and that hostile ones leave the service healthy.
"""

from __future__ import annotations

import base64

import pytest

from inference.images import output_size
from tests.integration.test_jobs_stack import URL
from tests.integration.test_serve_stack import _download
from tests.support.image_samples import ACCEPTED, REFUSED

GENERATED = [
    "cmyk-jpeg",
    "16-bit-png",
    "rgba-png",
    "exif-rotated-jpeg",
    "animated-webp",
    "palette-transparent-png",
]


def _post(client, data: bytes):
    image = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    return client.post(URL, json={"image": image, "prompt": "fuzz", "steps": 4})


@pytest.mark.parametrize("name", GENERATED)
def test_odd_images_generate_real_outputs_of_the_oriented_size(client, name):
    data, (width, height) = ACCEPTED[name]
    response = _post(client, data)
    assert response.status_code == 200, response.text
    image = _download(response.json()["images"][0]["url"])
    assert image.size == output_size(width, height, 0, 0, 2048)
    assert image.mode == "RGB"


def test_every_hostile_image_is_a_4xx_and_the_service_stays_healthy(client):
    for name, (data, status) in REFUSED.items():
        response = _post(client, data)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] in ("invalid_image", "image_dimensions_too_large"), name
    assert client.get("/readyz").status_code == 200
    assert _post(client, ACCEPTED["rgba-png"][0]).status_code == 200
