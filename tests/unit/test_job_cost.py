"""What a job used, and what it cost: every API's answer and every job object carries images,
denoising steps and model-seconds (its measured share of batched model time); a plan with prices adds
a cost; ``/v1/usage`` sums the same figures."""

from __future__ import annotations

import pytest

from serve.tenancy.keys import hash_key
from serve.tenancy.tenants import Prices, Tenant, TenantStore
from tests.unit.api_fakes import AUTH, data_url, image_bytes

KEY = "sk-priced-tenant-key-4Hq8xLp2Zr"
PRICED = {"Authorization": f"Bearer {KEY}"}
PRICES = Prices(currency="EUR", per_image=0.01, per_step=0.0005, per_model_second=0.02)


@pytest.fixture
def priced(app, client):
    tenant = Tenant(name="priced", key_hashes=[hash_key(KEY)], prices=PRICES)
    client.portal.call(TenantStore(app.state.service.store).save, tenant)
    client.portal.call(app.state.tenants.refresh)
    app.state.jobs.tenant_lookup = app.state.tenants.lookup  # as the coordinator wires it


def expected(images: int, steps: int) -> dict:
    # The fake backend meters steps x images and 0.25 model-seconds per image.
    unet_steps, seconds = steps * images, 0.25 * images
    amount = round(0.01 * images + 0.0005 * unet_steps + 0.02 * seconds, 6)
    return {
        "images": images,
        "steps": unet_steps,
        "model_seconds": seconds,
        "cost": {"amount": amount, "currency": "EUR"},
    }


def test_a_rest_job_object_carries_its_usage_and_cost_sync_and_async(client, app, priced):
    body = {"image": data_url(), "prompt": "p", "steps": 10, "num_images": 2}
    done = client.post("/v1/image-to-image", json=body, headers=PRICED).json()
    assert done["usage"] == expected(2, 10)
    assert client.get(f"/v1/image-to-image/{done['id']}", headers=PRICED).json()["usage"] == expected(2, 10)
    accepted = client.post(
        "/v1/image-to-image", json=body, headers={**PRICED, "Prefer": "respond-async"}
    ).json()
    client.portal.call(app.state.jobs.drain)
    job = client.get(f"/v1/image-to-image/{accepted['id']}", headers=PRICED).json()
    assert job["status"] == "completed" and job["usage"] == expected(2, 10)


def test_openai_answers_carry_the_same_figures(client, priced):
    files = {"image": ("a.png", image_bytes(), "image/png")}
    edit = client.post(
        "/v1/images/edits", data={"prompt": "p", "n": "1", "steps": "6"}, files=files, headers=PRICED
    )
    assert edit.json()["usage"] == expected(1, 6)


def test_usage_sums_the_figures_and_their_cost(client, priced):
    for images in (1, 3):
        body = {"image": data_url(), "prompt": "p", "steps": 10, "num_images": images}
        assert client.post("/v1/image-to-image", json=body, headers=PRICED).status_code == 200
    usage = client.get("/v1/usage", headers=PRICED).json()
    total = expected(4, 10)
    assert (usage["images"], usage["steps"], usage["model_seconds"]) == (4, 40, 1.0)
    assert usage["cost"] == total["cost"]


def test_without_prices_there_is_usage_but_no_cost(client):
    done = client.post(
        "/v1/image-to-image", json={"image": data_url(), "prompt": "p", "steps": 5}, headers=AUTH
    ).json()
    assert done["usage"] == {"images": 1, "steps": 5, "model_seconds": 0.25}
    assert "cost" not in client.get("/v1/usage", headers=AUTH).json()


def test_prices_are_validated():
    with pytest.raises(ValueError, match="currency"):
        Prices(currency="euro")
    with pytest.raises(ValueError, match="per_image"):
        Prices(per_image=-1)
