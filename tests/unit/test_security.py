"""Security review, pinned: secrets never reach logs, reprs or validation errors; keys and signatures
are compared in constant time; request bodies are capped while they stream; CORS is off unless
configured; responses carry no server banner and the API documents no library versions."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from urllib.parse import parse_qs, urlsplit

import fastapi
import httpx
import pydantic
import pytest
import starlette
from fastapi.middleware.cors import CORSMiddleware
from fastapi.testclient import TestClient
from pydantic import ValidationError

from inference.errors import GenerationError
from serve.config import AppArgs, Secrets
from serve.errors import AuthError
from serve.jobs import webhooks
from serve.jobs.runner import JobRunner
from serve.middleware.cors import CorsPolicy
from serve.observability.log_redaction import REDACTED, redact
from serve.outbound.fetch import FetchPolicy
from serve.storage.objects import LocalObjectStore
from serve.tenancy.tenants import Tenant, TenantDirectory
from tests.unit.api_fakes import (
    API_KEY,
    AUTH,
    BASE_URL,
    URL_SIGNING_KEY,
    WEBHOOK_SECRET,
    WebhookReceiver,
    assert_error,
    build_app,
    data_url,
    download,
    image_bytes,
    receiver_verifies,
)

URL = "/v1/image-to-image"
EDITS = "/v1/images/edits"
MODEL = {"spec": {"id": "m", "family": "sd", "source": "org/m"}}


def body(**overrides):
    return {"image": data_url(64, 48), "prompt": "a lighthouse", "steps": 4, **overrides}


def _signatures(job: dict) -> list[str]:
    return [parse_qs(urlsplit(image["url"]).query)["signature"][0] for image in job["images"]]


# ---------------------------------------------------------------- secrets never reach the logs


def test_no_key_or_secret_appears_in_any_log_record(client, app, backend, caplog):
    """Every path that logs (success, refusals, validation, a crash, a 5xx, a webhook delivery),
    with every record of every logger captured at DEBUG."""
    caplog.set_level(logging.DEBUG)
    app.state.service.fetch_policy = FetchPolicy(allow_networks=("127.0.0.1/32",))
    wrong_key = "sk-wrong-5d41402abc4b2a76b9719d911017c592"
    hook_token = "hook-token-7d793037a0760186574b0282f2f435e7"
    receiver = WebhookReceiver()
    try:
        done = client.post(URL, json=body(), headers=AUTH)
        assert done.status_code == 200, done.text
        download(client, done.json()["images"][0]["url"])
        for authorization in (f"Bearer {wrong_key}", f"Basic {wrong_key}", wrong_key):
            refused = {"Authorization": authorization, "Content-Type": "application/json"}
            assert client.post(URL, json=body(), headers=refused).status_code == 401
            assert client.post(URL, content=b"{oops", headers=refused).status_code == 401
        assert client.post(URL, json=body(strength=7), headers=AUTH).status_code == 400
        backend.error = RuntimeError("replica state dump")
        assert client.post(URL, json=body(), headers=AUTH).status_code == 500
        backend.error = GenerationError("the model replica failed", details="CUDA out of memory")
        assert client.post(URL, json=body(), headers=AUTH).status_code == 500
        backend.error = None
        hook = f"{receiver.url}?token={hook_token}"
        accepted = client.post(URL, json=body(webhook_url=hook), headers=AUTH)
        assert accepted.status_code == 202, accepted.text
        client.portal.call(app.state.jobs.drain)
    finally:
        receiver.close()
    delivered_headers, _ = receiver.received[-1]
    job = client.get(f"{URL}/{accepted.json()['id']}", headers=AUTH).json()
    secrets = {
        "API key": API_KEY,
        "refused key": wrong_key,
        "webhook secret": WEBHOOK_SECRET.decode(),
        "URL signing key": URL_SIGNING_KEY.decode(),
        "webhook URL token": hook_token,
        "webhook signature": delivered_headers[webhooks.SIGNATURE_HEADER].removeprefix("v1,"),
        **{f"output URL signature {i}": s for i, s in enumerate(_signatures(done.json()) + _signatures(job))},
    }
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    # The capture saw the interesting records, so their absence of secrets means something:
    assert "crashed" in logged and "Traceback" in logged  # the 500's traceback
    assert f"HTTP Request: POST {receiver.url}?{REDACTED}" in logged  # the delivery, redacted
    assert f"{BASE_URL}/files/" in logged  # the download's URL, with its signature redacted
    for name, secret in secrets.items():
        assert secret not in logged, f"the {name} leaked into the logs"


def test_redact_strips_query_strings_userinfo_and_bearer_tokens():
    line = (
        "HTTP Request: GET https://user:pa55@bucket.s3.example.com/in/a.png?X-Amz-Signature=abc123&"
        'X-Amz-Credential=AKIDEXAMPLE "HTTP/1.1 200 OK" Authorization: Bearer sk-acme-xyz'
    )
    cleaned = redact(line)
    for secret in ("abc123", "AKIDEXAMPLE", "pa55", "sk-acme-xyz"):
        assert secret not in cleaned
    assert "GET https://[redacted]@bucket.s3.example.com/in/a.png?[redacted]" in cleaned
    assert '"HTTP/1.1 200 OK"' in cleaned and redact("no urls here") == "no urls here"


# ---------------------------------------------------------------- config objects never print secrets

_ENV_SECRETS = {
    "IMG2IMG_DEV_API_KEY": "dev-key-3f2a9c1e8b",
    "IMG2IMG_URL_SIGNING_KEY": "signing-key-9b8c7d6e5f",
    "IMG2IMG_WEBHOOK_SECRET": "webhook-secret-1a2b3c4d5e",
    "IMG2IMG_S3_SECRET_KEY": "s3-secret-key-0f9e8d7c6b",
}


def test_config_reprs_never_show_secrets(monkeypatch, tmp_path):
    for name, value in _ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IMG2IMG_API_KEYS", '{"sk-acme-4e5f6a7b8c9d": "acme"}')
    secrets = Secrets()
    tenant = Tenant(name="acme", webhook_secret="tenant-webhook-secret-77aa")
    runner = JobRunner(service=None, jobs=None, render=None, webhook_secret=b"runner-webhook-secret-88bb")
    shown = " ".join(f"{item!r} {item!s}" for item in (secrets, tenant, runner))
    for secret in (*_ENV_SECRETS.values(), "sk-acme-4e5f6a7b8c9d", "tenant-webhook", "runner-webhook"):
        assert secret not in shown
    # ...while the code that needs them still gets them
    assert secrets.keys() == {"sk-acme-4e5f6a7b8c9d": "acme", "dev-key-3f2a9c1e8b": "dev"}
    assert secrets.webhook_secret.get_secret_value() == "webhook-secret-1a2b3c4d5e"
    assert tenant.model_dump()["webhook_secret"] == "tenant-webhook-secret-77aa"  # persisted as is


@pytest.mark.parametrize(
    ("build", "secret", "field"),
    [
        (
            lambda: Tenant(name="acme", key_hashes=["sk-acme-plain-key-5566"]),
            "sk-acme-plain-key",
            "key_hashes",
        ),
        (
            lambda: AppArgs.model_validate(
                {"models": [MODEL], "tenants": [{"name": "acme", "webhook_secret": "short-hook-9"}]}
            ),
            "short-hook-9",
            "webhook_secret",
        ),
        (lambda: Secrets(webhook_secret="secret"), "'secret'", "webhook_secret"),
    ],
    ids=["plain key as a hash", "short tenant webhook secret", "placeholder env secret"],
)
def test_validation_errors_name_the_field_but_never_echo_the_secret(build, secret, field):
    with pytest.raises(ValidationError) as caught:
        build()
    assert field in str(caught.value) and secret not in str(caught.value)


# ---------------------------------------------------------------- constant-time comparisons


@pytest.fixture
def compare_calls(monkeypatch) -> list[tuple]:
    """Every ``hmac.compare_digest`` call (still answered by the real one)."""
    calls: list[tuple] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


def test_api_keys_are_compared_as_digests_against_every_stored_hash(compare_calls):
    keys = {"key-a-1234567890": "a", "key-b-1234567890": "b", "key-c-1234567890": "c"}
    directory = TenantDirectory.from_plain_keys(keys)
    assert directory.tenant_for("Bearer key-b-1234567890") == "b"
    assert len(compare_calls) == 3  # no early exit at the match
    compare_calls.clear()
    with pytest.raises(AuthError):
        directory.tenant_for("Bearer key-z-1234567890")
    assert len(compare_calls) == 3
    assert all(len(a) == len(b) == 64 for a, b in compare_calls)  # SHA-256 digests, never the raw key


def test_url_and_webhook_signatures_are_compared_in_constant_time(compare_calls, tmp_path):
    store = LocalObjectStore(tmp_path, BASE_URL, URL_SIGNING_KEY)
    query = parse_qs(urlsplit(asyncio.run(store.url("t/a.png", 60))).query)
    assert store.verify("t/a.png", query["expires"][0], query["signature"][0])
    assert not store.verify("t/a.png", query["expires"][0], "0" * 64)
    now = int(time.time())
    headers = {
        "webhook-id": "m",
        "webhook-timestamp": str(now),
        "webhook-signature": webhooks.sign(WEBHOOK_SECRET, "m", now, b"{}"),
    }
    assert receiver_verifies(
        WEBHOOK_SECRET, b"{}", headers
    )  # the standardwebhooks package, as receivers use it
    assert len(compare_calls) == 3


# ---------------------------------------------------------------- body limits while streaming

SMALL = 4096


@pytest.fixture
def small_client(tmp_path, backend):
    app = build_app(tmp_path, backend, max_body_bytes=SMALL)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _chunked(payload: bytes, size: int = 1024):
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


def test_a_chunked_body_is_counted_not_trusted(small_client, backend):
    headers = {**AUTH, "Content-Type": "application/json"}
    small = httpx.Request("POST", URL, json=body()).content
    assert len(small) < SMALL
    fine = small_client.post(URL, content=_chunked(small), headers=headers)
    assert "content-length" not in fine.request.headers and fine.status_code == 200, fine.text
    big = small_client.post(URL, content=_chunked(b" " * (SMALL + 1) + small), headers=headers)
    assert "content-length" not in big.request.headers
    assert_error(big, 413, "payload_too_large", mentions=[f"{SMALL} bytes"])
    assert len(backend.calls) == 1


def test_a_lying_content_length_is_caught_by_counting(small_client, backend):
    lie = {**AUTH, "Content-Type": "application/json", "Content-Length": "100"}
    response = small_client.post(URL, content=b" " * (SMALL * 2), headers=lie)
    assert response.request.headers["content-length"] == "100"
    assert_error(response, 413, "payload_too_large")
    assert not backend.calls


def test_a_declared_length_over_the_limit_is_refused_before_reading(small_client):
    oversized = b" " * (SMALL + 1)
    response = small_client.post(URL, content=oversized, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")
    # Without a key the answer is 401, also before anything is read (issue 13, finding 8: the key first)
    response = small_client.post(URL, content=oversized, headers={"Content-Type": "application/json"})
    assert_error(response, 401, "unauthorized")


def test_an_oversized_multipart_edit_is_a_413_in_openai_shape(small_client, backend):
    upload = {"image": ("big.png", image_bytes(64, 48) + b"\0" * SMALL, "image/png")}
    response = small_client.post(EDITS, data={"prompt": "x"}, files=upload, headers=AUTH)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error"
    assert not backend.calls


@pytest.mark.anyio
async def test_a_streamed_body_is_refused_at_the_chunk_that_crosses_the_limit(tmp_path):
    pulled = 0

    async def endless():
        nonlocal pulled
        for _ in range(1000):  # ~1 MB offered in 1 KiB chunks
            pulled += 1
            yield b" " * 1024

    transport = httpx.ASGITransport(app=build_app(tmp_path, max_body_bytes=SMALL))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        response = await client.post(
            URL, content=endless(), headers={**AUTH, "Content-Type": "application/json"}
        )
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert pulled == SMALL // 1024 + 1  # the crossing chunk, and not one more


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- CORS: off unless configured

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def _cors_headers(response) -> list[str]:
    return [name for name in response.headers if name.lower().startswith("access-control-")]


def test_without_origins_there_is_no_cors_at_all(client, app):
    assert not any(m.cls is CORSMiddleware for m in app.user_middleware)
    preflight = client.options(URL, headers=PREFLIGHT)
    assert preflight.status_code == 405 and _cors_headers(preflight) == []
    simple = client.get("/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert simple.status_code == 200 and _cors_headers(simple) == []


def test_configured_origins_get_preflights_answered_and_no_one_else(tmp_path):
    app = build_app(tmp_path, cors=CorsPolicy(allow_origins=(ORIGIN,)))
    with TestClient(app, raise_server_exceptions=False) as client:
        preflight = client.options(URL, headers=PREFLIGHT)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        stranger = client.options(URL, headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
        refused = client.get("/v1/models", headers={"Origin": ORIGIN})  # errors stay readable by the page
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize(
    ("cors", "lesson"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "cannot be combined"),
        ({"allow_origins": ["*", ORIGIN]}, "list it alone"),
        ({"allow_origins": [f"{ORIGIN}/"]}, f"write it as '{ORIGIN}'"),
        ({"allow_origins": ["https://App.Example.com:443"]}, f"write it as '{ORIGIN}'"),
        ({"allow_origins": ["app.example.com"]}, "scheme://host"),
        ({"allow_origins": ["ftp://app.example.com"]}, "http or https"),
        ({"allow_origins": ["https://*.example.com"]}, "wildcards"),
        ({"allow_origin": [ORIGIN]}, "Extra inputs are not permitted"),
    ],
)
def test_cors_mistakes_fail_at_start_up_with_a_lesson(cors, lesson):
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate({"models": [MODEL], "cors": cors})
    assert lesson in str(caught.value) and "cors" in str(caught.value)


def test_cors_is_off_by_default_and_accepts_real_origins():
    assert not AppArgs.model_validate({"models": [MODEL]}).cors.enabled
    for origins in ([ORIGIN, "http://localhost:3000", "http://[::1]:8080"], ["*"]):
        assert AppArgs.model_validate({"models": [MODEL], "cors": {"allow_origins": origins}}).cors.enabled


# ---------------------------------------------------------------- no banners, no versions

LIBRARIES = re.compile(r"fastapi|starlette|pydantic|uvicorn|python|site-packages", re.IGNORECASE)
VERSIONS = (fastapi.__version__, starlette.__version__, pydantic.VERSION)


def test_responses_carry_no_server_banner(client, backend):
    responses = [
        client.get("/healthz"),
        client.get("/openapi.json"),
        client.get("/v1/models"),
        client.get("/no-such-route"),
        client.post(URL, json=body(), headers=AUTH),
        client.post(URL, json=body(strength=7), headers=AUTH),
    ]
    backend.error = RuntimeError("boom")
    responses.append(client.post(URL, json=body(), headers=AUTH))
    assert [r.status_code for r in responses] == [200, 200, 401, 404, 200, 400, 500]
    for response in responses:
        assert "server" not in response.headers and "x-powered-by" not in response.headers


def test_error_bodies_and_the_openapi_document_name_no_library_or_version(client, backend):
    texts = [client.get("/openapi.json").text, client.post(URL, json=body(strength=7), headers=AUTH).text]
    texts.append(
        client.post(URL, content=b"{oops", headers={**AUTH, "Content-Type": "application/json"}).text
    )
    backend.error = RuntimeError("boom")
    texts.append(client.post(URL, json=body(), headers=AUTH).text)
    for text in texts:
        assert not LIBRARIES.search(text), LIBRARIES.search(text)
        assert "Traceback (most recent call last)" not in text
        assert not any(f'"{version}"' in text or f" {version}" in text for version in VERSIONS)


def test_interactive_docs_are_off_and_the_contract_is_served(client):
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404
    assert client.get("/openapi.json").json()["info"]["version"] == "1"
