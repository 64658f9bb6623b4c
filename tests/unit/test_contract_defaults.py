"""What ``GET /v1/models`` says a model applies is what a call that leaves the parameter out gets, on
every API; steps and strength left out are each API's own spec defaults (REST and OpenAI 30 and 0.7,
the node spec 20 and 0.8), which no model overrides."""

from __future__ import annotations

import pytest

from inference.models import ModelRegistry
from tests.unit.api_fakes import AUTH, MODEL_CONFIG, build_app, data_url, image_bytes

#: A model whose own defaults differ from every API's, so a test can tell whose default applied.
OWN_DEFAULTS = {
    "id": "own-defaults",
    "family": "instruct-pix2pix",
    "source": "org/own",
    "default_guidance_scale": 4.25,
    "default_image_guidance_scale": 2.75,
}


@pytest.fixture
def served(tmp_path):
    from fastapi.testclient import TestClient

    app = build_app(tmp_path)
    app.state.service.registry = ModelRegistry.from_config([OWN_DEFAULTS, *MODEL_CONFIG])
    with TestClient(app) as client:
        yield client, app.state.service.backend


def rest(client):
    return client.post("/v1/image-to-image", json={"image": data_url(), "prompt": "p"}, headers=AUTH)


def node(client):
    body = {"source_image": data_url(), "prompt": "p", "negative_prompt": ""}
    return client.post("/v1/nodes/image_to_image", json=body, headers=AUTH)


def openai(client):
    files = {"image": ("a.png", image_bytes(), "image/png")}
    return client.post("/v1/images/edits", data={"prompt": "p"}, files=files, headers=AUTH)


@pytest.mark.parametrize(
    ("send", "steps", "strength"),
    [(rest, 30, 0.7), (node, 20, 0.8), (openai, 30, 0.7)],
    ids=["rest", "node", "openai"],
)
def test_a_call_that_leaves_parameters_out_gets_what_v1_models_advertises(served, send, steps, strength):
    client, backend = served
    advertised = next(
        m for m in client.get("/v1/models", headers=AUTH).json()["data"] if m["id"] == "own-defaults"
    )
    assert advertised["defaults"] == {"guidance_scale": 4.25, "image_guidance_scale": 2.75}
    response = send(client)
    assert response.status_code == 200, response.text
    ran = backend.last
    assert ran.model == "own-defaults"
    assert (ran.guidance_scale, ran.image_guidance_scale) == (4.25, 2.75)
    assert (ran.steps, ran.strength) == (steps, strength)  # the API's spec, not the model


def test_the_rest_response_and_job_say_the_guidance_the_call_ran_with(served):
    client, _ = served
    done = rest(client).json()
    assert done["guidance_scale"] == 4.25 and done["steps"] == 30
    stored = client.get(f"/v1/image-to-image/{done['id']}", headers=AUTH).json()
    assert stored["guidance_scale"] == 4.25


def test_a_caller_choice_beats_the_models_default(served):
    client, backend = served
    body = {"source_image": data_url(), "prompt": "p", "negative_prompt": "", "guidance_scale": 7.5}
    assert client.post(
        "/v1/nodes/image_to_image", json={**body, "image_guidance_scale": 1.5}, headers=AUTH
    ).is_success
    assert (backend.last.guidance_scale, backend.last.image_guidance_scale) == (7.5, 1.5)
