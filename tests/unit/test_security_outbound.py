"""Outbound HTTP under attack, over the public APIs (security round 2: findings 2, 5, 6 and 12).

Every test drives the in-process app over HTTP, with the real fetcher and the real webhook delivery,
against the hostile loopback server (``tests/support/hostile_http.py``, allow-listed as a lab would)
or a faked DNS. Nothing but 127.0.0.1 is ever contacted.

* 2: webhook receivers and image hosts answering with gzip bombs or endless bodies cost no memory and
  no time: we ask for ``identity``, never decode, and never read a webhook answer's body at all.
* 5: refusals and webhook attempt records never say what a host name resolves to, nor the library's
  text; the details are logged server-side.
* 6: IDNA host names that are not valid IDNA 2008 (``xn--n3h.com``), directly or as a redirect
  target, are a 400 in each API's envelope, never a 500.
* 12: https -> http redirects are refused; plain-http webhook targets are refused unless the operator
  allows them (``webhooks.allow_plain_http``) or the target is a literal allow-listed lab address.
"""

from __future__ import annotations

import logging
import time
import tracemalloc

import httpcore
import pytest
from pydantic import ValidationError

from serve.config import AppArgs, Secrets
from serve.outbound import fetch
from serve.outbound.fetch import FetchPolicy
from serve.wiring import wire
from tests.support.hostile_http import HostileHandler, gzip_bomb, hostile_server, https_redirecting_client
from tests.unit.api_fakes import AUTH, assert_error, data_url

#: A refused or failed source fetch, per API: REST says invalid_image, the node spec source_image_error.
FETCH_CODE = {"image": "invalid_image", "source_image": "source_image_error"}

URL = "/v1/image-to-image"
NODE_URL = "/v1/nodes/image_to_image"
BOMB_MIB = 64  # each bomb inflates to 64 MiB (a 64 KB gzip): reading one would show in the peak


def rest(client, url: str):
    return client.post(URL, json={"image": url, "prompt": "p"}, headers=AUTH)


def node(client, url: str):
    body = {"source_image": url, "prompt": "p", "negative_prompt": ""}
    return client.post(NODE_URL, json=body, headers=AUTH)


def webhook(client, url: str):
    return client.post(URL, json={"image": data_url(), "prompt": "p", "webhook_url": url}, headers=AUTH)


def run_job_with_webhook(client, url: str) -> dict:
    """Submit a job whose webhook goes to ``url``, run it and its delivery to the end, return the job."""
    response = webhook(client, url)
    assert response.status_code == 202, response.text
    client.portal.call(client.app.state.jobs.drain)
    return client.get(f"{URL}/{response.json()['id']}", headers=AUTH).json()


@pytest.fixture(scope="module")
def hostile():
    with hostile_server() as url:
        gzip_bomb(BOMB_MIB << 20)  # built once, before any measurement
        yield url


@pytest.fixture
def lab(app):
    """Production rules with 127.0.0.1 allow-listed (as a lab would), so the hostile server is reachable."""
    app.state.service.fetch_policy = FetchPolicy(
        max_bytes=10 * 1024 * 1024, read_timeout_s=2, total_timeout_s=3, allow_networks=("127.0.0.1/32",)
    )
    HostileHandler.requests.clear()


@pytest.fixture
def no_connections(monkeypatch):
    async def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(fetch, "resolve_host", refuse)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", refuse)


@pytest.fixture
def fake_dns(monkeypatch):
    """Names resolve to private addresses; other names do not exist."""

    async def resolve(host, port):
        table = {"hooks.internal": ["10.9.8.7"], "db.internal": ["10.20.30.40"]}
        if host not in table:
            raise OSError(-2, "Name or service not known")
        return table[host]

    monkeypatch.setattr(fetch, "resolve_host", resolve)


# ---------------------------------------------------------------- finding 2: response bombs


def test_webhook_receivers_answering_with_gzip_bombs_cost_no_memory(client, lab, hostile):
    """Three receivers each answer with a 64 KB gzip of 64 MiB of zeros: nothing is read or decoded."""
    tracemalloc.start()
    try:
        jobs = [webhook(client, f"{hostile}/gzip?mib={BOMB_MIB}&receiver={i}").json()["id"] for i in range(3)]
        client.portal.call(client.app.state.jobs.drain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for job_id in jobs:
        hook = client.get(f"{URL}/{job_id}", headers=AUTH).json()["webhook"]
        assert hook["status"] == "delivered", hook
        assert [a["status_code"] for a in hook["attempts"]] == [200]
    posts = [headers for method, _, headers in HostileHandler.requests if method == "POST"]
    assert len(posts) == 3 and all(h.get("Accept-Encoding") == "identity" for h in posts), posts
    # Decoding one bomb alone would allocate 64 MiB; the whole round trip stays far below that.
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_a_webhook_receiver_whose_answer_never_ends_is_not_waited_for(client, lab, hostile):
    started = time.monotonic()
    hook = run_job_with_webhook(client, f"{hostile}/endless")["webhook"]
    assert hook["status"] == "delivered" and hook["attempts"][0]["status_code"] == 200, hook
    assert time.monotonic() - started < 4.5  # the endless body lasts 5 s; only the headers are read


@pytest.mark.parametrize(("send", "param"), [(rest, "image"), (node, "source_image")])
def test_a_source_image_answering_with_a_gzip_bomb_is_a_400_unread(
    client, backend, lab, hostile, send, param
):
    tracemalloc.start()
    try:
        response = send(client, f"{hostile}/gzip?mib={BOMB_MIB}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_error(response, 400, FETCH_CODE[param], param=param, mentions=["Content-Encoding"])
    assert HostileHandler.requests[-1][2].get("Accept-Encoding") == "identity"
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert not backend.calls


# ---------------------------------------------------------------- finding 6: IDNA host names

IDNA_URLS = [
    "http://xn--n3h.com/a.png",  # the review's example: U+2603 (snowman) is not allowed by IDNA 2008
    "https://XN--N3H.COM/a.png",
    "http://img.xn--n3h.com/a.png",
    "http://\u2603.com/a.png",  # the same host in Unicode
]


@pytest.mark.parametrize("url", IDNA_URLS)
@pytest.mark.parametrize(
    ("send", "param", "code"),
    [
        (rest, "image", "invalid_image"),
        (node, "source_image", "source_image_error"),
        (webhook, "webhook_url", "invalid_webhook_url"),
    ],
)
def test_an_invalid_idna_host_is_a_400_in_each_api(client, backend, no_connections, url, send, param, code):
    assert_error(send(client, url), 400, code, param=param, mentions=["IDNA"])
    assert not backend.calls


@pytest.mark.parametrize(("send", "param"), [(rest, "image"), (node, "source_image")])
def test_a_redirect_to_an_invalid_idna_host_is_a_400(client, backend, lab, hostile, send, param):
    response = send(client, f"{hostile}/redirect?to=http://xn--n3h.com/a.png")
    assert_error(response, 400, FETCH_CODE[param], param=param, mentions=["internationalised domain name"])
    assert not backend.calls


def test_a_webhook_receiver_redirecting_to_an_invalid_idna_host_is_a_failed_attempt(client, lab, hostile):
    hook = run_job_with_webhook(client, f"{hostile}/redirect?to=http://xn--n3h.com/hook")["webhook"]
    assert hook["status"] == "failed", hook
    assert {a["code"] for a in hook["attempts"]} == {"protocol_error"}, hook


def test_a_valid_idna_host_is_looked_up_like_any_name(client, backend, fake_dns):
    # münchen.example is valid IDNA: it is resolved (here: does not exist) and refused as not public.
    error = assert_error(rest(client, "http://xn--mnchen-3ya.example/a.png"), 400, "invalid_image")
    assert "does not resolve to public internet addresses" in error["message"], error


# ---------------------------------------------------------------- finding 12: SSRF edges


@pytest.mark.parametrize(("send", "param"), [(rest, "image"), (node, "source_image")])
def test_a_redirect_from_https_to_http_is_refused(client, backend, lab, hostile, monkeypatch, send, param):
    monkeypatch.setattr(
        fetch, "pinned_client", https_redirecting_client(fetch.pinned_client, f"{hostile}/png")
    )
    response = send(client, "https://images.example/a.png")
    assert_error(response, 400, FETCH_CODE[param], param=param, mentions=["from https to plain http"])
    assert not HostileHandler.requests  # the plain-http target was never contacted
    assert not backend.calls


def test_plain_http_webhook_targets_are_refused_by_default(client, backend, no_connections):
    error = assert_error(
        webhook(client, "http://hooks.example/x"), 400, "invalid_webhook_url", param="webhook_url"
    )
    assert "https" in error["message"], error
    assert not backend.calls


def test_https_webhook_targets_are_accepted(client, fake_dns):
    assert webhook(client, "https://hooks.example/x").status_code == 202


def test_the_operator_can_allow_plain_http_webhooks(client, app, fake_dns):
    app.state.service.fetch_policy = FetchPolicy(allow_plain_http_webhooks=True)
    assert webhook(client, "http://hooks.example/x").status_code == 202
    # ... which never lifts an SSRF rule:
    assert_error(webhook(client, "http://10.0.0.1/x"), 400, "invalid_webhook_url", param="webhook_url")


def test_a_literal_lab_address_may_use_plain_http(client, lab, hostile):
    hook = run_job_with_webhook(client, f"{hostile}/status/204")["webhook"]
    assert hook["status"] == "delivered", hook


def test_a_webhook_redirect_is_never_followed(client, lab, hostile):
    hook = run_job_with_webhook(client, f"{hostile}/redirect?to={hostile}/status/204")["webhook"]
    assert hook["status"] == "failed", hook
    assert {a["error"] for a in hook["attempts"]} == {"HTTP 302 (redirects are not followed)"}, hook
    assert [p for _, p, _ in HostileHandler.requests if p.startswith("/status")] == []


def test_the_plain_http_webhook_policy_is_an_app_setting_with_a_teaching_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IMG2IMG_URL_SIGNING_KEY", "signing-key-for-tests")
    monkeypatch.setenv("IMG2IMG_DEV_API_KEY", "sk-dev-key-for-the-wiring-test-4f9a")
    minimal = {
        "models": [{"spec": {"id": "m", "family": "sd", "source": "org/m"}}],
        "storage": {"local_root": str(tmp_path)},
    }
    assert AppArgs.model_validate(minimal).webhooks.allow_plain_http is False
    parsed = AppArgs.model_validate(minimal | {"webhooks": {"allow_plain_http": True}})
    service = wire(parsed, Secrets(), backend=None).service  # how ingress and coordinator are built
    assert service.fetch_policy.allow_plain_http_webhooks is True
    with pytest.raises(ValidationError, match=r"webhooks\.allow_plain_http"):
        AppArgs.model_validate(minimal | {"webhooks": {"allow_plain_http": "sometimes"}})


# ---------------------------------------------------------------- finding 5 (outbound): no DNS oracle


def test_an_internal_name_and_a_missing_name_get_the_same_refusal(client, backend, fake_dns, caplog):
    caplog.set_level(logging.WARNING, "serve.outbound.fetch")
    answers = []
    for host in ("db.internal", "missing.internal"):
        error = assert_error(rest(client, f"http://{host}/a.png"), 400, "invalid_image", param="image")
        answers.append(error["message"].replace(host, "HOST"))
        assert "10.20.30.40" not in str(error) and "private" not in str(error), error
    assert answers[0] == answers[1], answers
    assert "10.20.30.40 (private)" in caplog.text  # the operator still sees it
    assert not backend.calls


def test_webhook_attempt_records_do_not_reveal_what_a_name_resolves_to(client, fake_dns, caplog):
    caplog.set_level(logging.WARNING)
    job = run_job_with_webhook(client, "https://hooks.internal/x")
    attempts = job["webhook"]["attempts"]
    assert job["webhook"]["status"] == "failed" and len(attempts) == 3, job["webhook"]
    for attempt in attempts:
        assert attempt["code"] == "target_refused", attempt
        assert attempt["error"] == "the webhook target is not allowed (public https hosts only)", attempt
    assert "10.9.8.7" not in str(job)
    assert "10.9.8.7 (private)" in caplog.text


def test_webhook_connection_failures_are_recorded_without_the_library_text(client, lab):
    job = run_job_with_webhook(client, "http://127.0.0.1:1/hook")  # allow-listed, nothing listens
    for attempt in job["webhook"]["attempts"]:
        assert attempt["code"] == "connect_failed", attempt
        assert attempt["error"] == "could not connect to the webhook target", attempt
    assert "Errno" not in str(job) and "ConnectError" not in str(job)
