"""Tenants: hashed keys, plans (models, images), rate and concurrency limits (429 + Retry-After),
usage metering, live key revocation, and the admin CLI, through the HTTP layer with in-process parts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from serve import admin
from serve.errors import RateLimitedError
from serve.tenancy.governor import Limits, TenantGovernor
from serve.tenancy.keys import hash_key
from serve.tenancy.tenants import Tenant, TenantCatalog, TenantDirectory, TenantStore
from tests.unit.api_fakes import assert_error, data_url, image_bytes

URL = "/v1/image-to-image"
KEY = "sk-acme-test-key-0001"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def body(**overrides):
    return {"image": data_url(64, 48), "prompt": "a tram", "steps": 10, **overrides}


@pytest.fixture
def acme(app, client):
    """Adds tenant 'acme' (key KEY) to the store; returns a function that updates its plan."""
    store = TenantStore(app.state.service.store)

    def save(**plan) -> Tenant:
        tenant = Tenant(name="acme", key_hashes=[hash_key(KEY)], **plan)
        client.portal.call(store.save, tenant)
        client.portal.call(app.state.tenants.refresh)
        return tenant

    save()
    return save


def test_keys_are_stored_only_as_hashes_and_authenticate(app, client, acme):
    raw = client.portal.call(app.state.service.store.get, "_tenants/acme.json").decode()
    assert KEY not in raw and hash_key(KEY) in raw
    assert client.post(URL, json=body(), headers=HEADERS).status_code == 200


def test_a_revoked_key_stops_working_after_a_refresh(app, client, acme):
    assert client.post(URL, json=body(), headers=HEADERS).status_code == 200
    tenant = acme()
    tenant.key_hashes = []
    client.portal.call(TenantStore(app.state.service.store).save, tenant)
    client.portal.call(app.state.tenants.refresh)
    assert_error(client.post(URL, json=body(), headers=HEADERS), 401, "unauthorized")


def test_rate_limit_answers_429_with_retry_after(client, acme):
    acme(rate_limit_images_per_minute=3)
    assert client.post(URL, json=body(num_images=2), headers=HEADERS).status_code == 200
    refused = client.post(URL, json=body(num_images=2), headers=HEADERS)
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1


def test_concurrency_limit_counts_requests_in_flight(client, backend, acme):
    acme(concurrency_limit=1)
    backend.gate = client.portal.call(asyncio.Event)
    first = client.post(URL, json=body(), headers={**HEADERS, "Prefer": "respond-async"})
    assert first.status_code == 202
    assert_error(client.post(URL, json=body(), headers=HEADERS), 429, "rate_limited")
    client.portal.call(backend.gate.set)
    client.portal.call(client.app.state.jobs.drain)
    assert client.post(URL, json=body(), headers=HEADERS).status_code == 200  # the slot was released


def test_plan_limits_models_and_images_per_request(client, acme):
    acme(allowed_models=["sdxl-test"], max_images_per_request=2)
    assert_error(client.post(URL, json=body(), headers=HEADERS), 403, "model_not_allowed", param="model")
    response = client.post(URL, json=body(model="sdxl-test", num_images=3), headers=HEADERS)
    assert_error(response, 400, "invalid_parameter", param="num_images")
    assert client.post(URL, json=body(model="sdxl-test", num_images=2), headers=HEADERS).status_code == 200


def test_a_plan_limit_names_each_apis_own_field_in_its_own_codes(client, backend, acme):
    """The same refusal (3 images, the plan allows 2) in REST's, the node spec's and OpenAI's words."""
    acme(max_images_per_request=2)
    rest = client.post(URL, json=body(num_images=3), headers=HEADERS)
    assert_error(rest, 400, "invalid_parameter", param="num_images", mentions=["at most 2"])
    node_body = {"source_image": data_url(64, 48), "prompt": "a tram", "negative_prompt": "", "batch_size": 3}
    node = client.post("/v1/nodes/image_to_image", json=node_body, headers=HEADERS)
    assert_error(node, 400, "batch_size_exceeded", param="batch_size", mentions=["at most 2"])
    openai = client.post(
        "/v1/images/edits",
        data={"prompt": "a tram", "n": "3"},
        files={"image": ("a.png", image_bytes(), "image/png")},
        headers=HEADERS,
    )
    assert openai.status_code == 400, openai.text
    error = openai.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("n", "invalid_value", "invalid_request_error")
    assert "num_images" not in openai.text and "num_images" not in node.text
    assert backend.calls == []


def test_usage_is_metered_per_tenant(client, acme):
    for images in (1, 3):
        assert client.post(URL, json=body(num_images=images), headers=HEADERS).status_code == 200
    usage = client.get("/v1/usage", headers=HEADERS).json()
    assert usage["tenant"] == "acme"
    assert (usage["requests"], usage["images"]) == (2, 4)
    assert usage["steps"] == 10 * 4  # the fake backend meters steps x images
    other = client.get("/v1/usage", headers={"Authorization": "Bearer test-key-123"}).json()
    assert other["requests"] == 0  # another tenant sees only its own
    assert_error(
        client.get("/v1/usage?start=2026-01-01T00:00:00Z&end=2026-06-01T00:00:00Z", headers=HEADERS),
        400,
        "invalid_parameter",
    )


@pytest.mark.parametrize(
    "query",
    [
        "end=0.5",  # a number is not an ISO 8601 date-time
        "start=0001-01-01T00:00:00Z",  # the day before would overflow
        "end=0001-01-01T00:30:00%2B01:00",  # converting to UTC would overflow
        "start=9999-12-31T23:00:00Z",
        "start=yesterday",
    ],
)
def test_usage_times_outside_iso_8601_or_the_calendar_are_a_400_not_a_500(client, acme, query):
    assert_error(client.get(f"/v1/usage?{query}", headers=HEADERS), 400, "invalid_parameter")


def test_token_bucket_refills_over_time():
    now = [0.0]
    governor = TenantGovernor(clock=lambda: now[0])
    limits = Limits(images_per_minute=60)
    governor.admit("t", "a", 60, limits)
    with pytest.raises(RateLimitedError) as refused:
        governor.admit("t", "b", 2, limits)
    assert refused.value.retry_after_s == pytest.approx(2.0)
    now[0] = 2.0
    governor.admit("t", "b", 2, limits)


def test_usage_survives_in_the_store(tmp_path):
    from serve.storage.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path, "http://x", b"0123456789abcdef")
    first = TenantGovernor(store=store)
    first.release("t", "r1", {"requests": 1, "images": 2, "steps": 30, "compute_seconds": 0.5})
    asyncio.run(first.flush())
    later = TenantGovernor(store=store)  # a restarted governor
    now = datetime.now(UTC)
    totals = asyncio.run(later.usage("t", now - timedelta(hours=1), now))
    assert totals == {"requests": 1, "images": 2, "steps": 30, "compute_seconds": 0.5}


def test_admin_cli_creates_issues_rotates_and_revokes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "serve_config.yaml"
    args = {
        "models": [{"spec": {"id": "m", "family": "sd", "source": "org/m"}}],
        "storage": {"kind": "local", "local_root": str(tmp_path / "store")},
    }
    config.write_text(yaml.safe_dump({"applications": [{"args": args}]}))
    monkeypatch.setenv("IMG2IMG_DEV_API_KEY", "dev-key-8Hq2xLp9Zr4W")  # the key policy: 16+ chars

    def cli(*argv) -> str:
        assert admin.main(["--config", str(config), *argv]) == 0
        return capsys.readouterr().out.strip()

    cli("create-tenant", "beta", "--rate", "10", "--concurrency", "2")
    first = cli("issue-key", "beta").splitlines()[0]
    second = cli("rotate-key", "beta").splitlines()[0]
    store = admin._store(config)
    catalog = TenantCatalog(TenantDirectory([]), TenantStore(store))
    asyncio.run(catalog.refresh())
    assert catalog.tenant_for(f"Bearer {first}") == catalog.tenant_for(f"Bearer {second}") == "beta"
    assert "revoked 1 key" in cli("revoke-key", "beta", "--all-but-newest")
    asyncio.run(catalog.refresh())
    assert catalog.tenant_for(f"Bearer {second}") == "beta"
    with pytest.raises(Exception, match="invalid API key"):
        catalog.tenant_for(f"Bearer {first}")
    shown = cli("show", "beta")
    assert first not in shown and second not in shown and '"concurrency_limit": 2' in shown


def test_a_full_model_queue_is_503_with_retry_after(client, backend):
    """Serve's bounded queue (max_queued_requests) raises BackPressureError; the backend maps it to this."""
    from serve.errors import OverloadedError

    backend.error = OverloadedError("model sd-test is at capacity; retry shortly")
    response = client.post(URL, json=body(), headers={"Authorization": "Bearer test-key-123"})
    assert_error(response, 503, "overloaded")
    assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("plan", "asked", "lane"),
    [("normal", None, 1), ("high", None, 0), ("high", "low", 2), ("low", "high", 2), ("normal", "normal", 1)],
)
def test_a_call_may_lower_its_plans_priority_never_raise_it(client, backend, acme, plan, asked, lane):
    acme(priority=plan)
    headers = {**HEADERS, "X-Priority": asked} if asked else HEADERS
    assert client.post(URL, json=body(), headers=headers).status_code == 200
    assert backend.last.priority == lane


def test_an_unknown_priority_is_a_400(client, acme):
    response = client.post(URL, json=body(), headers={**HEADERS, "X-Priority": "urgent"})
    assert_error(response, 400, "invalid_parameter")
