"""``POST /v1/image-to-image`` (REST spec, seed 003) through the app with a fake model backend."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import pytest

from inference.errors import GenerationError, ImageTooLargeError, RequestCancelledError
from serve.api.styles import STYLES
from serve.errors import (
    GenerationTimeoutError,
    ModelUnavailableError,
    OverloadedError,
    StorageUnavailableError,
)
from serve.jobs import runner as job_runner
from serve.outbound.fetch import SourceFetchError
from tests.unit.api_fakes import (
    AUTH,
    MODEL_IDS,
    assert_error,
    data_url,
    decode,
    download,
    image_bytes,
    route_helpers,
    seed_colour,
)

URL = "/v1/image-to-image"
SOURCE = data_url(64, 48)  # a 64x48 PNG: both sides already multiples of 8
SPEC_FIELDS = {
    "id",
    "status",
    "prompt",
    "negative_prompt",
    "model",
    "strength",
    "steps",
    "guidance_scale",
    "seed",
    "style",
    "created_at",
    "completed_at",
    "original_image",
    "images",
}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def body(**overrides):
    return {"image": SOURCE, "prompt": "a red fox in the snow", **overrides}


post, ok = route_helpers(URL)


# ------------------------------------------------------------------ parameters: bounds and defaults


def test_defaults_are_the_specs(client, backend):
    result = ok(client, body())
    got = backend.last
    assert (got.strength, got.steps, got.guidance_scale, got.num_images) == (0.7, 30, 7.5, 1)
    assert got.negative_prompt is None
    assert backend.last_model == MODEL_IDS[0]
    assert (result["strength"], result["steps"], result["guidance_scale"]) == (0.7, 30, 7.5)
    assert result["negative_prompt"] is None and result["style"] is None
    assert len(result["images"]) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("strength", 0.1),
        ("strength", 1.0),
        ("strength", 0.45),
        ("steps", 1),
        ("steps", 50),
        ("guidance_scale", 0.01),
        ("guidance_scale", 20),
        ("num_images", 1),
        ("num_images", 4),
        ("seed", 0),
        ("seed", 2**32 - 1),
    ],
)
def test_in_range_values_reach_the_backend(client, backend, field, value):
    result = ok(client, body(**{field: value}))
    assert getattr(backend.last, field) == value
    if field == "num_images":  # the spec's response has no num_images field, only the images
        assert len(result["images"]) == value
    else:
        assert result[field] == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("strength", 0.09),
        ("strength", 1.01),
        ("strength", 0),
        ("strength", "strong"),
        ("steps", 0),
        ("steps", 51),
        ("steps", 2.5),
        ("guidance_scale", 0),
        ("guidance_scale", -1),
        ("guidance_scale", 20.01),
        ("num_images", 0),
        ("num_images", 5),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", "abc"),
        ("negative_prompt", "x" * 2001),
        ("prompt", "x" * 2001),
        ("output_format", "gif"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(client, backend, field, value):
    assert_error(
        post(client, body(**{field: value})), 400, "invalid_parameter", param=field, mentions=[field]
    )
    assert backend.calls == []


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_blank_prompt_is_refused(client, backend, prompt):
    assert_error(post(client, body(prompt=prompt)), 400, "invalid_parameter", param="prompt")
    assert backend.calls == []


@pytest.mark.parametrize("missing", ["prompt", "image"])
def test_required_fields(client, missing):
    payload = body()
    del payload[missing]
    code = "invalid_image" if missing == "image" else "invalid_parameter"
    assert_error(post(client, payload), 400, code, param=missing, mentions=[missing])


def test_seed_is_drawn_when_absent_and_echoed(client, backend):
    first = ok(client, body())
    assert first["seed"] == backend.last.seed
    assert 0 <= first["seed"] < 2**32
    second = ok(client, body(seed=None))
    assert second["seed"] == backend.last.seed
    assert first["seed"] != second["seed"]  # 1 in 2^32 to collide


def test_given_seed_is_used_and_images_follow_it(client, backend):
    result = ok(client, body(seed=1234, num_images=2))
    assert result["seed"] == 1234 and backend.last.seed == 1234
    colours = [decode(download(client, image["url"])).getpixel((0, 0)) for image in result["images"]]
    assert colours == [seed_colour(1234), seed_colour(1235)]


def test_negative_prompt_is_passed_and_echoed(client, backend):
    result = ok(client, body(negative_prompt="blurry, low quality"))
    assert backend.last.negative_prompt == "blurry, low quality"
    assert result["negative_prompt"] == "blurry, low quality"


@pytest.mark.parametrize("model", MODEL_IDS)
def test_every_configured_model_can_be_chosen(client, backend, model):
    result = ok(client, body(model=model))
    assert backend.last_model == model and backend.last.model == model
    assert result["model"] == model


def test_unknown_model_lists_the_configured_ones(client, backend):
    assert_error(
        post(client, body(model="imagen-v2")), 400, "model_not_found", param="model", mentions=MODEL_IDS
    )
    assert backend.calls == []


def test_unknown_style_lists_the_known_ones(client):
    assert_error(
        post(client, body(style="vaporwave")), 400, "invalid_style", param="style", mentions=list(STYLES)
    )


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_augments_what_the_backend_gets_but_not_the_echo(client, backend, name):
    style = STYLES[name]
    result = ok(client, body(style=name, negative_prompt="text"))
    assert backend.last.prompt == f"a red fox in the snow, {style.prompt_suffix}"
    assert backend.last.negative_prompt == f"text, {style.negative_suffix}"
    assert result["prompt"] == "a red fox in the snow"
    assert result["negative_prompt"] == "text"
    assert result["style"] == name


def test_style_without_negative_prompt(client, backend):
    ok(client, body(style="anime"))
    assert backend.last.negative_prompt == STYLES["anime"].negative_suffix


@pytest.mark.parametrize("url", ["https://hooks.example.com/done", "https://example.com:8443/x?y=1"])
def test_https_webhook_urls_are_accepted_for_asynchronous_delivery(client, url, monkeypatch):
    """Plain http targets are refused unless the operator opts in (tests/unit/test_security_outbound.py)."""
    delivered = []

    async def fake_deliver(target, payload, *args, **kwargs):  # no network in unit tests
        delivered.append((target, payload["status"]))
        return True

    monkeypatch.setattr(job_runner, "deliver", fake_deliver)
    response = post(client, body(webhook_url=url))
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/image-to-image/{response.json()['id']}"
    client.portal.call(client.app.state.jobs.drain)
    assert delivered == [(url, "completed")]


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "not a url", "example.com/hook", ""])
def test_non_http_webhook_urls_are_refused(client, url):
    assert_error(post(client, body(webhook_url=url)), 400, "invalid_parameter", param="webhook_url")


@pytest.mark.parametrize("field", ["stength", "n", "image_guidance_scale", "size"])
def test_unknown_fields_are_refused(client, backend, field):
    assert_error(post(client, body(**{field: 1})), 400, "invalid_parameter", param=field, mentions=[field])
    assert backend.calls == []


@pytest.mark.parametrize("raw", [b"{not json", b'{"image": "x",', b""])
def test_invalid_json_is_invalid_request(client, raw):
    response = client.post(URL, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_request", "invalid_parameter", "invalid_image")
    if raw != b"":
        assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42"])
def test_non_object_json_is_refused(client, raw):
    response = client.post(URL, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("fmt", "extension", "pil_format"),
    [("png", "png", "PNG"), ("jpeg", "jpg", "JPEG"), ("webp", "webp", "WEBP")],
)
def test_output_format(client, fmt, extension, pil_format):
    result = ok(client, body(output_format=fmt, num_images=2))
    for image in result["images"]:
        assert urlsplit(image["url"]).path.endswith(f".{extension}")
        response = client.get(image["url"])
        assert response.headers["content-type"] == f"image/{fmt}"
        assert decode(response.content).format == pil_format


# ------------------------------------------------------------------ the response object


def test_response_has_every_spec_field(client, backend):
    result = ok(client, body(num_images=3, style="realistic", seed=7))
    assert set(result) >= SPEC_FIELDS
    assert result["id"].startswith("img_")
    assert backend.last.request_id == result["id"]
    assert result["status"] == "completed"
    assert TIMESTAMP.fullmatch(result["created_at"]) and TIMESTAMP.fullmatch(result["completed_at"])
    assert result["created_at"] <= result["completed_at"]
    assert result["original_image"].keys() == {"url", "width", "height"}
    assert len(result["images"]) == 3
    for image in result["images"]:
        assert image.keys() == {"url", "width", "height"}
        assert (image["width"], image["height"]) == (64, 48)
    assert len({image["url"] for image in result["images"]}) == 3
    assert result.get("warnings", []) == []


def test_output_images_download_as_png_of_the_stated_size(client):
    result = ok(client, body(num_images=2))
    for image in result["images"]:
        response = client.get(image["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        picture = decode(response.content)
        assert picture.format == "PNG"
        assert picture.size == (image["width"], image["height"])


def test_output_size_is_the_source_rounded_to_multiples_of_8(client, backend):
    result = ok(client, body(image=data_url(101, 203)))
    assert backend.last.image.size == (104, 200)
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (104, 200)
    assert (result["original_image"]["width"], result["original_image"]["height"]) == (101, 203)


@pytest.mark.parametrize(("fmt", "extension"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_data_url_source_is_stored_and_linked(client, fmt, extension):
    result = ok(client, body(image=data_url(40, 24, fmt)))
    original = result["original_image"]
    assert (original["width"], original["height"]) == (40, 24)
    assert urlsplit(original["url"]).path.endswith(f"/source.{extension}")
    assert download(client, original["url"]) == image_bytes(40, 24, fmt)


def test_url_source_is_fetched_and_echoed(client, backend, fake_fetch):
    url = "https://example.com/input-image.jpg"
    result = ok(client, body(image=url))
    assert fake_fetch.urls == [url]
    assert result["original_image"] == {"url": url, "width": 96, "height": 64}
    assert backend.last.image.size == (96, 64)


def test_pix2pix_ignores_strength_with_a_warning(client):
    result = ok(client, body(model="pix2pix-test", strength=0.5))
    assert any("strength" in warning for warning in result["warnings"])


def test_tenant_reaches_the_backend(client, backend):
    ok(client, body())
    assert backend.last.tenant == "tenant-a"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "image",
    [
        pytest.param("data:image/png;base64,!!!!not-base64!!!!", id="garbage-base64"),
        pytest.param("data:image/png;base64," + base64.b64encode(b"hello world").decode(), id="not-an-image"),
        pytest.param(base64.b64encode(image_bytes()).decode(), id="bare-base64"),
        pytest.param("data:image/png," + "abc", id="data-url-not-base64"),
        pytest.param(
            "data:image/png;base64," + base64.b64encode(image_bytes()[:60]).decode(), id="truncated-png"
        ),
        pytest.param("file:///etc/passwd", id="file-url"),
        pytest.param("/tmp/cat.png", id="path"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_images_are_400_invalid_image(client, backend, image):
    assert_error(post(client, body(image=image)), 400, "invalid_image", param="image")
    assert backend.calls == []


def test_data_url_over_10_mb_is_413_image_too_large(client, backend):
    response = post(client, body(image="data:image/png;base64," + "A" * 14_000_000))
    assert_error(response, 413, "image_too_large", param="image")
    assert backend.calls == []


def test_body_over_16_mb_is_413_payload_too_large(client):
    response = client.post(
        URL, content=b"x" * (16 * 1024 * 1024 + 1), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")


def test_oversized_dimensions_are_400(client, backend):
    response = post(client, body(image=data_url(3000, 10)))
    assert_error(response, 400, "image_dimensions_too_large", param="image", mentions=["3000x10"])
    assert backend.calls == []


def test_unreachable_source_url_is_400(client, backend, fake_fetch):
    fake_fetch.error = SourceFetchError("source image URL answered HTTP 404 Not Found")
    response = post(client, body(image="https://example.com/missing.jpg"))
    assert_error(response, 400, "invalid_image", param="image", mentions=["404"])
    assert backend.calls == []


def test_too_large_source_url_is_413(client, fake_fetch):
    fake_fetch.error = ImageTooLargeError("source image is larger than the limit", param="image")
    assert_error(post(client, body(image="https://example.com/huge.jpg")), 413, "image_too_large")


def test_fetched_bytes_that_are_not_an_image_are_400(client, fake_fetch):
    fake_fetch.data = b"<html>not an image</html>"
    assert_error(post(client, body(image="https://example.com/page.jpg")), 400, "invalid_image")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong"),
        pytest.param({"Authorization": "Token test-key-123"}, id="wrong-scheme"),
        pytest.param({"Authorization": "Bearer "}, id="empty-key"),
        pytest.param({"Authorization": "test-key-123"}, id="no-scheme"),
    ],
)
def test_bad_credentials_are_401(client, backend, headers):
    assert_error(post(client, body(), headers=headers), 401, "unauthorized")
    assert backend.calls == []


def test_bearer_scheme_is_case_insensitive(client):
    assert post(client, body(), headers={"Authorization": "bearer test-key-123"}).status_code == 200


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(body(strength=5), id="out-of-range"),
        pytest.param({"prompt": "x"}, id="missing-image"),
        pytest.param(body(image="data:image/png;base64,!!!"), id="bad-image"),
        pytest.param(body(model="imagen-v3"), id="unknown-model"),
    ],
)
def test_auth_is_checked_before_validation(client, payload):
    assert_error(post(client, payload, headers={"Authorization": "Bearer nope"}), 401, "unauthorized")


def test_auth_is_checked_before_json_parsing(client):
    response = client.post(
        URL, content=b"{oops", headers={"Authorization": "Bearer nope", "Content-Type": "application/json"}
    )
    assert response.status_code == 401


def test_generation_failure_is_500(client, backend):
    backend.error = GenerationError("the model replica failed", details="CUDA out of memory")
    assert_error(post(client, body()), 500, "generation_failed")


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (OverloadedError, "overloaded", 503),
        (ModelUnavailableError, "model_unavailable", 503),
        (GenerationTimeoutError, "timeout", 504),
        (RequestCancelledError, "canceled", 409),
    ],
)
def test_serving_failures_keep_their_status(client, backend, error, code, status):
    backend.error = error("backend said no")
    response = post(client, body())
    assert_error(response, status, code)
    retry = {"overloaded": "2", "model_unavailable": "10"}.get(code)
    assert response.headers.get("retry-after") == retry  # from the class, not from a table of codes


def test_storage_failure_is_503(client, app, monkeypatch):
    async def broken_put(key, data, content_type):
        raise StorageUnavailableError("S3 at s3.local is unreachable (store an object)")

    monkeypatch.setattr(app.state.service.store, "put", broken_put)
    assert_error(post(client, body()), 503, "storage_unavailable")


def test_unexpected_backend_exception_is_a_json_500_without_internals(client, backend):
    backend.error = RuntimeError("secret internal state /srv/models/weights.bin")
    response = post(client, body())
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert error["message"]


# ------------------------------------------------------------------ the spec's own examples

CURL_EXAMPLE = {
    "image": "https://example.com/input-image.jpg",
    "prompt": "Transform this into a cyberpunk style with neon lights and futuristic elements",
    "model": "imagen-v3",
    "strength": 0.8,
    "steps": 50,
    "guidance_scale": 8.0,
    "negative_prompt": "blurry, low quality",
    "style": "cyberpunk",
    "num_images": 2,
}


def test_curl_example_names_a_model_we_do_not_serve(client, backend, fake_fetch):
    response = post(client, CURL_EXAMPLE)
    assert_error(response, 400, "model_not_found", param="model", mentions=["imagen-v3", *MODEL_IDS])
    assert backend.calls == [] and fake_fetch.urls == []  # refused before downloading anything


def test_curl_example_without_model(client, backend, fake_fetch):
    payload = {k: v for k, v in CURL_EXAMPLE.items() if k != "model"}
    result = ok(client, payload)
    got = backend.last
    assert fake_fetch.urls == ["https://example.com/input-image.jpg"]
    assert (got.strength, got.steps, got.guidance_scale, got.num_images) == (0.8, 50, 8.0, 2)
    assert got.prompt == f"{payload['prompt']}, {STYLES['cyberpunk'].prompt_suffix}"
    assert got.negative_prompt == f"blurry, low quality, {STYLES['cyberpunk'].negative_suffix}"
    assert result["prompt"] == payload["prompt"]
    assert result["style"] == "cyberpunk" and result["model"] == MODEL_IDS[0]
    assert result["original_image"]["url"] == payload["image"]
    assert len(result["images"]) == 2


SPEC_EXAMPLES = {
    "style-transfer": {
        "image": "https://example.com/portrait.jpg",
        "prompt": "Transform into Van Gogh painting style with swirling brushstrokes",
        "strength": 0.6,
        "style": "artistic",
    },
    "photo-enhancement": {
        "image": "https://example.com/old-photo.jpg",
        "prompt": "Enhance quality, improve lighting, remove noise, make colors more vibrant",
        "strength": 0.4,
        "steps": 40,
    },
    "scene-modification": {
        "image": "https://example.com/landscape.jpg",
        "prompt": "Change from day to night, add stars and moonlight",
        "strength": 0.7,
        "negative_prompt": "sun, daylight, bright",
    },
    "fashion-and-product": {
        "image": "https://example.com/product.jpg",
        "prompt": "Place product in luxury setting with elegant background",
        "strength": 0.5,
        "style": "realistic",
    },
    "code-examples": {
        "image": "https://example.com/input.jpg",
        "prompt": "Transform into cyberpunk style",
        "strength": 0.7,
        "steps": 40,
    },
}


@pytest.mark.parametrize("example", SPEC_EXAMPLES.values(), ids=SPEC_EXAMPLES.keys())
def test_spec_use_case_examples(client, backend, fake_fetch, example):
    result = ok(client, example)
    got = backend.last
    assert fake_fetch.urls == [example["image"]]
    assert got.strength == example["strength"]
    assert got.steps == example.get("steps", 30)
    assert got.guidance_scale == 7.5 and got.num_images == 1
    style = STYLES.get(example.get("style"))
    assert got.prompt == (f"{example['prompt']}, {style.prompt_suffix}" if style else example["prompt"])
    negative = ", ".join(p for p in (example.get("negative_prompt"), style and style.negative_suffix) if p)
    assert got.negative_prompt == (negative or None)
    assert result["prompt"] == example["prompt"]
    assert result["style"] == example.get("style")
    assert result["original_image"] == {"url": example["image"], "width": 96, "height": 64}
    assert [(i["width"], i["height"]) for i in result["images"]] == [(96, 64)]
