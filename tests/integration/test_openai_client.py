"""The real ``openai`` Python client against the live stack's ``/v1/images/edits`` (Ray, tiny model, S3)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import wait_until_ready


def _png(size=(64, 64), colour=(40, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    wait_until_ready(stack)
    # No retries: a refusal must surface as the exception the client maps it to, at once.
    with openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120
    ) as c:
        yield c


def _download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)  # presigned: no credentials
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_edit_returns_urls_of_pngs_of_the_requested_size(client, stack):
    result = client.images.edit(
        image=("source.png", _png((80, 48)), "image/png"),
        prompt="a blue lake",
        n=2,
        size="64x64",
        response_format="url",
        extra_body={"steps": 6, "seed": 11},
    )
    assert abs(result.created - time.time()) < 300
    assert len(result.data) == 2
    assert result.usage.images == 2 and result.usage.steps > 0  # what the edit used, through the client
    assert result.usage.model_seconds > 0
    images = []
    for item in result.data:
        assert item.b64_json is None and stack.s3.endpoint in item.url
        image = _download(item.url)
        assert (image.format, image.size) == ("PNG", (64, 64))
        images.append(image.tobytes())
    assert images[0] != images[1]  # seeds 11 and 12


def test_b64_json_with_extension_fields_is_deterministic_per_seed(client):
    def edit() -> bytes:
        result = client.images.edit(
            image=io.BytesIO(_png()),  # a bare stream: the client names the part itself
            prompt="a red kite",
            response_format="b64_json",
            extra_body={"strength": 0.5, "seed": 3, "steps": 6},
        )
        assert len(result.data) == 1 and result.data[0].url is None
        return base64.b64decode(result.data[0].b64_json)

    first, second = edit(), edit()
    image = Image.open(io.BytesIO(first))
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert Image.open(io.BytesIO(second)).tobytes() == image.tobytes()


def test_a_list_of_one_image_is_sent_as_image_array(client):
    result = client.images.edit(image=[("a.png", _png(), "image/png")], prompt="fog", extra_body={"steps": 4})
    assert len(result.data) == 1 and _download(result.data[0].url).size == (64, 64)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 9}, "n"),
        ({"size": "big"}, "size"),
        ({"image": ("junk.png", b"definitely not a png", "image/png")}, "image"),
        ({"model": "dall-e-3"}, "model"),  # dall-e-2 and gpt-image-1 are aliases of the served model
        ({"mask": ("mask.png", _png(), "image/png")}, "mask"),
    ],
)
def test_bad_requests_raise_bad_request_error_naming_the_param(client, kwargs, param):
    arguments = {"image": ("source.png", _png(), "image/png"), "prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(**arguments, extra_body={"steps": 4})
    error = raised.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert isinstance(error.body, dict) and error.body["param"] == param


def test_a_wrong_key_raises_authentication_error(stack):
    wrong = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="not-a-key", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as raised:
        wrong.images.edit(image=("s.png", _png(), "image/png"), prompt="x")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


def test_openai_model_names_reach_the_model_they_alias(client):
    for name in ("gpt-image-1", "dall-e-2"):
        result = client.images.edit(
            image=("source.png", _png(), "image/png"),
            model=name,
            prompt="a red barn",
            response_format="b64_json",
            extra_body={"steps": 2, "seed": 5},
        )
        assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)


def test_an_unknown_openai_model_is_a_400_naming_ours_and_the_aliases(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("source.png", _png(), "image/png"), model="dall-e-3", prompt="x")
    error = refused.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(name in error["message"] for name in ("tiny-sd", "gpt-image-1", "dall-e-2"))
