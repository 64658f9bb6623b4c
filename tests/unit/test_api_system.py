"""Health, readiness, listings, signed files, the OpenAPI schema and the catch-all error handling."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import pytest

from serve.api.styles import STYLES
from serve.errors import StorageUnavailableError
from tests.unit.api_fakes import AUTH, MODEL_IDS, assert_error, data_url

REST = "/v1/image-to-image"
NODE = "/v1/nodes/image_to_image"


def generate(client) -> dict:
    response = client.post(REST, json={"image": data_url(), "prompt": "a fox"}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------ health and readiness


def test_healthz_needs_no_key(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_ready(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "problems": {}}


def test_readyz_names_models_that_are_not_ready(client, backend):
    backend.ready = {"sd-test": None, "sdxl-test": "waiting for a GPU", "pix2pix-test": "loading"}
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready",
        "problems": {"model:sdxl-test": "waiting for a GPU", "model:pix2pix-test": "loading"},
    }


def test_readyz_names_storage_and_logs_its_internal_details_once(client, app, monkeypatch, caplog):
    async def broken_check():
        raise StorageUnavailableError("S3 bucket 'img' does not exist at http://minio.internal:9000")

    monkeypatch.setattr(app.state.service.store, "check", broken_check)
    with caplog.at_level("WARNING", logger="serve.readiness"):
        for _ in range(3):
            response = client.get("/readyz")
    assert response.status_code == 503
    problem = response.json()["problems"]["storage"]
    assert (
        "unavailable" in problem and "minio.internal" not in response.text
    )  # no internal host to the public
    logged = [r.getMessage() for r in caplog.records if "minio.internal" in r.getMessage()]
    assert len(logged) == 1  # once per change, not once per probe
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="serve.readiness"):
        assert client.get("/readyz").status_code == 200
    assert "available again" in caplog.records[-1].getMessage()


# ------------------------------------------------------------------ listings


@pytest.mark.parametrize("path", ["/v1/models", "/v1/styles"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["missing", "wrong"])
def test_listings_need_a_key(client, path, headers):
    assert_error(client.get(path, headers=headers), 401, "unauthorized")


def test_models_listing(client):
    response = client.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    models = response.json()["data"]
    assert [m["id"] for m in models] == MODEL_IDS
    assert [m["family"] for m in models] == ["sd", "sdxl", "instruct-pix2pix"]
    for model in models:
        assert set(model["defaults"]) == {"guidance_scale", "image_guidance_scale"}  # what a model applies
        assert model["honoured_parameters"] == sorted(model["honoured_parameters"])
        assert "source" not in model  # where weights live is not the caller's business
    honoured = {m["id"]: set(m["honoured_parameters"]) for m in models}
    assert "strength" not in honoured["pix2pix-test"] and "image_guidance_scale" in honoured["pix2pix-test"]
    assert "prompt_2" in honoured["sdxl-test"] and "prompt_2" not in honoured["sd-test"]


def test_styles_listing(client):
    response = client.get("/v1/styles", headers=AUTH)
    assert response.status_code == 200
    styles = response.json()["styles"]
    assert [s["name"] for s in styles] == list(STYLES)
    assert all(s["description"] for s in styles)


# ------------------------------------------------------------------ signed files


def test_file_urls_download(client):
    url = generate(client)["images"][0]["url"]
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def _with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return f"{parts.scheme}://{parts.netloc}{parts.path}?" + "&".join(f"{k}={v}" for k, v in query.items())


def test_tampered_signature_is_403(client):
    url = generate(client)["images"][0]["url"]
    signature = parse_qs(urlsplit(url).query)["signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert_error(client.get(_with_query(url, signature=flipped)), 403, "forbidden")


def test_extended_expiry_is_403(client):
    url = generate(client)["images"][0]["url"]
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert_error(client.get(_with_query(url, expires=expires + 3600)), 403, "forbidden")


def test_signature_of_another_file_is_403(client):
    first, second = (generate(client)["images"][0]["url"] for _ in range(2))
    forged = urlsplit(second).path + "?" + urlsplit(first).query
    assert_error(client.get(forged), 403, "forbidden")


def test_expired_link_is_403(client, app):
    store = app.state.service.store
    url = generate(client)["images"][0]["url"]
    key = urlsplit(url).path.removeprefix("/files/")
    past = 1_000_000
    assert_error(
        client.get(_with_query(url, expires=past, signature=store._sign(key, past))), 403, "forbidden"
    )


def test_signed_link_to_a_missing_file_is_404(client, app):
    url = asyncio.run(app.state.service.store.url("tenant-a/2024/01/01/img_x/0.png", 60))
    assert_error(client.get(url), 404, "not_found")


def test_file_link_without_signature_is_refused(client):
    response = client.get("/files/tenant-a/2024/01/01/img_x/0.png")
    assert response.status_code in (400, 403)


# ------------------------------------------------------------------ OpenAPI

#: The node spec's input schema keywords that must survive into ours (defaults and bounds).
NODE_SPEC_PROPERTIES = {
    "guidance_scale": {"default": 7.5, "exclusiveMinimum": 0, "maximum": 15},
    "image_guidance_scale": {"default": 1.5, "exclusiveMinimum": 0, "maximum": 15},
    "strength": {"default": 0.8, "exclusiveMinimum": 0, "maximum": 1},
    "steps": {"default": 20, "exclusiveMinimum": 0, "maximum": 50},
    "batch_size": {"default": 1, "exclusiveMinimum": 0, "maximum": 8},
    "seed": {"default": None},
    "prompt_2": {"default": None},
    "width": {"default": 0},
    "height": {"default": 0},
}


@pytest.fixture
def openapi(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_openapi_lists_both_image_routes(openapi):
    assert "post" in openapi["paths"][REST]
    assert "post" in openapi["paths"][NODE]
    assert not any(path.startswith("/files") for path in openapi["paths"])


def test_openapi_node_input_matches_the_node_spec(openapi):
    schemas = openapi["components"]["schemas"]
    node_input = schemas["ImageToImageNodeInput"]
    assert set(node_input["required"]) == {"source_image", "prompt", "negative_prompt"}
    for name, keywords in NODE_SPEC_PROPERTIES.items():
        for keyword, value in keywords.items():
            assert node_input["properties"][name].get(keyword) == value, (name, keyword)
    output = schemas["ImageToImageNodeOutput"]
    assert output["required"] == ["images"]
    assert output["properties"]["images"]["items"] == {"type": "string"}


def test_openapi_rest_request_has_the_spec_fields(openapi):
    request = next(
        s for n, s in openapi["components"]["schemas"].items() if n.startswith("ImageToImageRequest")
    )
    assert set(request["required"]) == {"image", "prompt"}
    spec_fields = {
        "image",
        "prompt",
        "model",
        "strength",
        "steps",
        "guidance_scale",
        "negative_prompt",
        "seed",
        "num_images",
        "style",
        "webhook_url",
    }
    assert spec_fields <= set(request["properties"])
    strength = request["properties"]["strength"]
    assert (strength["default"], strength["minimum"], strength["maximum"]) == (0.7, 0.1, 1.0)
    assert request["properties"]["num_images"]["maximum"] == 4


# ------------------------------------------------------------------ cross-cutting


class RecordingMetrics:
    def __init__(self) -> None:
        self.done: list[tuple[str, int]] = []

    def request_done(self, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.done.append((route, status))


def test_metrics_use_route_templates_and_skip_unknown_paths(client, app):
    app.state.metrics = metrics = RecordingMetrics()
    generate(client)
    client.post(REST, json={}, headers={})
    client.get("/no/such/path")
    url = generate(client)["images"][0]["url"]
    client.get(url)
    assert metrics.done == [
        (REST, 200),
        (REST, 401),
        (REST, 200),
        ("/files/{key:path}", 200),
    ]


def test_metrics_count_unexpected_500s(client, app, backend):
    app.state.metrics = metrics = RecordingMetrics()
    backend.error = RuntimeError("bug")
    client.post(REST, json={"image": data_url(), "prompt": "x"}, headers=AUTH)
    assert metrics.done == [(REST, 500)]


@pytest.mark.parametrize("path", [REST, NODE])
def test_unexpected_exception_gives_json_500_and_logs_it(client, backend, caplog, path):
    backend.error = ZeroDivisionError("division by zero in the scheduler")
    payload = (
        {"image": data_url(), "prompt": "x"}
        if path == REST
        else {"source_image": data_url(), "prompt": "x", "negative_prompt": ""}
    )
    with caplog.at_level("ERROR", logger="serve.api.app"):
        response = client.post(path, json=payload, headers=AUTH)
    assert_error(response, 500, "internal_error")
    assert "ZeroDivisionError" not in response.text and "scheduler" not in response.text
    assert any(record.exc_info and record.exc_info[0] is ZeroDivisionError for record in caplog.records)
