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


def test_streaming_edits_iterate_partial_images_from_the_engine_then_the_image(client):
    """``stream=True, partial_images=2``: the real engine's previews, then the image, through the
    unchanged client; the final image equals what the same edit returns without streaming."""
    arguments = {
        "image": ("source.png", _png((64, 64)), "image/png"),
        "prompt": "a green field",
        "size": "128x128",
        "extra_body": {"steps": 12, "strength": 1.0, "seed": 21},
    }
    events = list(client.images.edit(**arguments, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    partials = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events[:2]]
    assert all((p.format, p.size) == ("PNG", (128, 128)) for p in partials)
    assert partials[0].tobytes() != partials[1].tobytes()  # the latents moved between them
    done = events[-1]
    assert done.size == "128x128" and done.usage.images == 1 and done.usage.steps == 12
    plain = client.images.edit(**arguments, response_format="b64_json")
    streamed = Image.open(io.BytesIO(base64.b64decode(done.b64_json)))
    assert streamed.tobytes() == Image.open(io.BytesIO(base64.b64decode(plain.data[0].b64_json))).tobytes()


def _metric_sum(stack, name: str) -> float:
    text = httpx.get(f"http://{stack.metrics_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_stream_whose_client_disconnects_leaves_the_engine(client, stack):
    """The client reads one partial image and hangs up: the engine drops the request, so far fewer
    than its 50 denoising steps run (counted by the replica's UNet-call counter)."""
    from ray import serve

    from tests.integration.conftest import wait_for

    replica = serve.get_deployment_handle("model-tiny-sd", app_name="img2img")
    active = lambda: replica.ready.remote().result(timeout_s=10)["active"]  # noqa: E731
    wait_for(lambda: active() == 0, 60, 0.5, "an idle model replica")
    calls_before = _metric_sum(stack, "ray_img2img_unet_calls_total")
    files = {"image": ("s.png", _png((64, 64)), "image/png")}
    data = {"prompt": "slow", "stream": "true", "partial_images": "3", "size": "512x512", "n": "4"}
    data |= {"steps": "50", "strength": "1.0", "seed": "1"}
    with httpx.Client(base_url=stack.base_url, timeout=120) as http:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with http.stream("POST", "/v1/images/edits", data=data, files=files, headers=headers) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("event: "))
            assert first == "event: image_edit.partial_image"
    wait_for(lambda: active() == 0, 60, 0.2, "the engine to drop the canceled samples")
    time.sleep(3)  # the counter is exported every second
    steps_run = _metric_sum(stack, "ray_img2img_unet_calls_total") - calls_before
    assert 0 < steps_run < 50, f"{steps_run} UNet calls: the canceled stream ran to the end"
