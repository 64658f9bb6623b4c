"""``POST /v1/images/edits`` (OpenAI's image-edit API, multipart) through the app with a fake backend."""

from __future__ import annotations

import base64
import time

import pytest

from inference.errors import GenerationError
from inference.images import ImageLimits
from serve.errors import StorageUnavailableError
from tests.unit.api_fakes import AUTH, MODEL_IDS, decode, download, image_bytes, seed_colour

URL = "/v1/images/edits"
SOURCE = image_bytes(64, 48)  # a 64x48 PNG


def files(name: str = "image", data: bytes = SOURCE, count: int = 1) -> list[tuple]:
    return [(name, (f"source{i}.png", data, "image/png")) for i in range(count)]


def post(client, fields=None, upload=None, headers=AUTH):
    data = {"prompt": "a red fox in the snow", **(fields or {})}
    return client.post(URL, data=data, files=files() if upload is None else upload, headers=headers)


def ok(client, fields=None, upload=None) -> dict:
    response = post(client, fields, upload)
    assert response.status_code == 200, response.text
    return response.json()


def openai_error(response, status: int, *, param: str | None = None, kind="invalid_request_error") -> dict:
    """OpenAI's envelope: exactly {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == kind, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["code"], str) and error["code"], error
    if param is not None:
        assert error["param"] == param, error
    assert "Traceback" not in response.text
    return error


# ------------------------------------------------------------------ success


def test_url_response_links_pngs_of_the_source_size(client, backend):
    before = int(time.time())
    body = ok(client)
    assert set(body) == {"created", "data", "usage"}  # usage: what the edit used (test_job_cost.py)
    assert before - 1 <= body["created"] <= time.time() + 1
    assert len(body["data"]) == 1 and set(body["data"][0]) == {"url"}
    image = decode(download(client, body["data"][0]["url"]))
    assert (image.format, image.size) == ("PNG", (64, 48))
    assert image.getpixel((0, 0)) == seed_colour(backend.last.seed)


def test_defaults_are_the_rest_specs(client, backend):
    ok(client)
    got = backend.last
    assert (got.strength, got.steps, got.guidance_scale, got.num_images) == (0.7, 30, 7.5, 1)
    assert got.negative_prompt is None and backend.last_model == MODEL_IDS[0]


def test_b64_json_returns_the_png_bytes(client, backend):
    body = ok(client, {"response_format": "b64_json", "n": "2"})
    assert [set(item) for item in body["data"]] == [{"b64_json"}] * 2
    images = [decode(base64.b64decode(item["b64_json"])) for item in body["data"]]
    assert {(image.format, image.size) for image in images} == {("PNG", (64, 48))}
    assert [image.getpixel((0, 0)) for image in images] == [seed_colour(s) for s in backend.last.seeds]


def test_n_gives_that_many_images(client, backend):
    body = ok(client, {"n": "3"})
    assert len(body["data"]) == 3 and backend.last.num_images == 3
    assert len({item["url"] for item in body["data"]}) == 3


@pytest.mark.parametrize(
    ("size", "expected"),
    [("128x64", (128, 64)), ("256X256", (256, 256)), ("100x50", (104, 48)), ("auto", (64, 48))],
)
def test_size_sets_the_output_size_in_multiples_of_8(client, size, expected):
    body = ok(client, {"size": size, "response_format": "b64_json"})
    assert decode(base64.b64decode(body["data"][0]["b64_json"])).size == expected


def test_image_array_form_is_accepted(client, backend):
    ok(client, upload=files("image[]"))
    assert backend.last.image.size == (64, 48)


def test_extension_fields_reach_the_model(client, backend):
    fields = {"strength": "0.5", "seed": "3", "steps": "6", "guidance_scale": "4", "negative_prompt": "blur"}
    ok(client, {**fields, "model": MODEL_IDS[1], "user": "someone"})
    got = backend.last
    assert (got.strength, got.seed, got.steps, got.guidance_scale) == (0.5, 3, 6, 4.0)
    assert got.negative_prompt == "blur" and backend.last_model == MODEL_IDS[1]


def test_jpeg_upload_is_sniffed_whatever_it_is_called(client, backend):
    ok(client, upload=[("image", ("photo.png", image_bytes(40, 32, "JPEG"), "image/png"))])
    assert backend.last.image.size == (40, 32)


# ------------------------------------------------------------------ refusals


def test_missing_prompt_names_the_param(client, backend):
    response = client.post(URL, data={}, files=files(), headers=AUTH)
    error = openai_error(response, 400, param="prompt")
    assert error["code"] == "missing_required_parameter"
    assert not backend.calls


@pytest.mark.parametrize("n", ["0", "5", "two"])
def test_bad_n_is_a_400_on_n(client, n, backend):
    openai_error(post(client, {"n": n}), 400, param="n")
    assert not backend.calls


@pytest.mark.parametrize("size", ["abc", "0x64", "4096x4096", "64", "64x64x64", "-8x8"])
def test_bad_size_is_a_400_on_size(client, size):
    error = openai_error(post(client, {"size": size}), 400, param="size")
    assert "WxH" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("strength", "0"), ("steps", "51"), ("guidance_scale", "0"), ("seed", "-1")]
)
def test_extension_fields_are_bounded(client, field, value):
    openai_error(post(client, {field: value}), 400, param=field)


def test_mask_is_refused(client, backend):
    upload = files() + files("mask")
    error = openai_error(post(client, upload=upload), 400, param="mask")
    assert "not supported" in error["message"] and not backend.calls


def test_more_than_one_source_image_is_refused(client, backend):
    error = openai_error(post(client, upload=files("image[]", count=2)), 400, param="image")
    assert "one source image" in error["message"] and not backend.calls


def test_missing_image_is_a_400_on_image(client):
    openai_error(client.post(URL, data={"prompt": "x"}, headers=AUTH), 400, param="image")


def test_non_image_upload_is_a_400_on_image(client, backend):
    upload = [("image", ("notes.txt", b"hello, not a picture", "text/plain"))]
    openai_error(post(client, upload=upload), 400, param="image")
    assert not backend.calls


def test_oversized_upload_is_a_413_on_image(client, app):
    app.state.service.image_limits = ImageLimits(max_bytes=len(SOURCE) - 1)
    openai_error(post(client), 413, param="image")


def test_unknown_fields_are_refused_like_openai_does(client):
    error = openai_error(post(client, {"quality": "high"}), 400, param="quality")
    assert error["code"] == "unknown_parameter"


@pytest.mark.parametrize("model", ["dall-e-2", "gpt-image-1", "nope"])
def test_unknown_model_lists_ours(client, model, backend):
    error = openai_error(post(client, {"model": model}), 400, param="model")
    assert error["code"] == "model_not_found"
    assert all(model_id in error["message"] for model_id in MODEL_IDS)
    assert not backend.calls


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong-key"}, {}])
def test_bad_key_is_a_401_before_any_validation(client, headers, backend):
    for fields in ({}, {"n": "99"}):  # a bad form must not be described to an unauthenticated caller
        error = openai_error(post(client, fields, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    assert not backend.calls


def test_backend_failure_is_a_500_server_error(client, backend):
    backend.error = GenerationError("the model replica failed", details="CUDA out of memory")
    error = openai_error(post(client), 500, kind="server_error")
    assert error["code"] == "generation_failed" and error["message"]
    assert "replica failed" not in error["message"] and "CUDA" not in error["message"]  # logged, not sent


def test_storage_outage_is_a_503_with_retry_after(client, app, monkeypatch):
    async def unavailable(*_args, **_kwargs):
        raise StorageUnavailableError("S3 is unreachable")

    monkeypatch.setattr(app.state.service.store, "put", unavailable)
    response = post(client)
    openai_error(response, 503, kind="server_error")
    assert response.headers["Retry-After"] == "5"


def test_unknown_path_under_images_answers_in_openai_shape(client):
    openai_error(client.post("/v1/images/generations", data={"prompt": "x"}, headers=AUTH), 404)


def test_other_apis_keep_their_own_error_shape(client):
    response = client.post("/v1/image-to-image", json={}, headers=AUTH)
    assert response.status_code == 400 and {"code", "message", "details"} <= set(response.json()["error"])


def test_configured_aliases_reach_their_model_and_are_listed(app, client, backend):
    app.state.model_aliases = {"gpt-image-1": MODEL_IDS[1]}
    ok(client, {"model": "gpt-image-1"})
    assert backend.last_model == MODEL_IDS[1]
    listed = {m["id"]: m["aliases"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert listed[MODEL_IDS[1]] == ["gpt-image-1"] and listed[MODEL_IDS[0]] == []
    error = openai_error(post(client, {"model": "dall-e-2"}), 400, param="model")
    assert error["code"] == "model_not_found" and "gpt-image-1" in error["message"]
