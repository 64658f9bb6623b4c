"""The SSRF suite over HTTP: image URLs and webhook URLs sent to the public APIs, with the real fetcher.

serve.outbound.fetch's own tests (test_fetch.py) pin each rule; this suite proves the APIs are wired to it:
every private, loopback, link-local, mapped or non-http target is refused with a clear 4xx in the
API's envelope, names that resolve into private space and redirects into it are refused, and an
allow-listed but hostile server (oversized, lying, dripping) cannot exhaust memory or hold a worker.
Only 127.0.0.1 is ever contacted; DNS is faked where a name must resolve.
"""

from __future__ import annotations

import time

import httpcore
import pytest

from serve.outbound import fetch
from serve.outbound.fetch import FetchPolicy
from tests.support.hostile_http import hostile_server
from tests.unit.api_fakes import AUTH, assert_error

#: A refused or failed source fetch, per API: REST says invalid_image, the node spec source_image_error.
FETCH_CODE = {"image": "invalid_image", "source_image": "source_image_error"}

FORBIDDEN_TARGETS = [
    "http://127.0.0.1/a.png",
    "http://127.1/a.png",  # short form of loopback
    "http://2130706433/a.png",  # loopback as one decimal number
    "http://0x7f000001/a.png",  # ... and in hex
    "http://localhost/a.png",
    "http://0.0.0.0/a.png",
    "http://[::1]/a.png",
    "http://[::ffff:127.0.0.1]/a.png",  # IPv4-mapped loopback
    "http://[::ffff:10.0.0.1]/a.png",  # IPv4-mapped private
    "http://[0:0:0:0:0:ffff:7f00:1]/a.png",
    "http://10.0.0.1/a.png",
    "http://172.16.0.1/a.png",
    "http://192.168.1.1/a.png",
    "http://100.64.0.1/a.png",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[fd00::1]/a.png",  # unique local
    "http://[fe80::1]/a.png",  # link-local
    "http://224.0.0.1/a.png",  # multicast
    "http://[fec0::1]/a.png",  # deprecated site-local (passed as public before round 2)
    "http://192.0.0.8/a.png",  # IPv4 dummy address (passed as public before round 2)
    "http://192.0.0.9/a.png",  # PCP anycast: the local gateway
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of the metadata endpoint
]
FORBIDDEN_SCHEMES = [
    "file:///etc/passwd",
    "ftp://example.com/a.png",
    "gopher://example.com/_GET",
    "dict://example.com:11211/stat",
    "jar:http://example.com/a.jar!/a.png",
]


def rest(client, url: str):
    return client.post("/v1/image-to-image", json={"image": url, "prompt": "p"}, headers=AUTH)


def node(client, url: str):
    body = {"source_image": url, "prompt": "p", "negative_prompt": ""}
    return client.post("/v1/nodes/image_to_image", json=body, headers=AUTH)


def webhook(client, url: str):
    body = {"image": "http://images.example/a.png", "prompt": "p", "webhook_url": url}
    return client.post("/v1/image-to-image", json=body, headers=AUTH)


@pytest.fixture
def no_connections(monkeypatch):
    """Any DNS lookup or connection fails the test: refusals must come from validation."""

    async def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(fetch, "resolve_host", refuse)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", refuse)  # literals skip DNS: guard dialing


@pytest.mark.parametrize("url", FORBIDDEN_TARGETS)
@pytest.mark.parametrize(("send", "param"), [(rest, "image"), (node, "source_image")])
def test_private_targets_are_refused_before_any_connection(client, backend, no_connections, url, send, param):
    assert_error(send(client, url), 400, FETCH_CODE[param], param=param)
    assert not backend.calls


@pytest.mark.parametrize("url", FORBIDDEN_SCHEMES)
@pytest.mark.parametrize(
    ("send", "param", "code"),
    [(rest, "image", "invalid_image"), (node, "source_image", "source_image_error")],
)
def test_foreign_schemes_are_refused_as_not_an_image_reference(
    client, backend, no_connections, url, send, param, code
):
    assert_error(send(client, url), 400, code, param=param, mentions=["http(s) URL"])
    assert not backend.calls


@pytest.mark.parametrize("url", FORBIDDEN_TARGETS + FORBIDDEN_SCHEMES)
def test_webhook_urls_into_private_space_are_refused_at_submission(client, backend, no_connections, url):
    code = "invalid_webhook_url" if url in FORBIDDEN_TARGETS else "invalid_parameter"  # schema: http(s) only
    assert_error(webhook(client, url), 400, code, param="webhook_url")
    assert not backend.calls


def test_a_name_that_resolves_to_a_private_address_is_refused(client, backend, monkeypatch):
    async def resolve(host, port):
        return {"internal.example": ["10.1.2.3"], "mixed.example": ["93.184.216.34", "127.0.0.1"]}[host]

    monkeypatch.setattr(fetch, "resolve_host", resolve)
    for host in ("internal.example", "mixed.example"):  # one private address among public ones is enough
        error = assert_error(rest(client, f"http://{host}/a.png"), 400, "invalid_image", param="image")
        assert "forbidden" in error["message"], error
        for leak in ("10.1.2.3", "127.0.0.1", "private", "loopback"):  # no DNS oracle (finding 5)
            assert leak not in str(error), error
    assert not backend.calls


@pytest.fixture(scope="module")
def hostile():
    with hostile_server() as url:
        yield url


@pytest.fixture
def loopback_allowed(app):
    """Production rules with 127.0.0.1 allow-listed (as a lab would), so the hostile server is reachable."""
    app.state.service.fetch_policy = FetchPolicy(
        max_bytes=64 * 1024, read_timeout_s=2, total_timeout_s=3, allow_networks=("127.0.0.1/32",)
    )


def test_the_allow_listed_server_itself_works(client, backend, hostile, loopback_allowed):
    assert rest(client, f"{hostile}/png").status_code == 200
    assert backend.last.image.size == (8, 8)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "file:///etc/passwd",
    ],
)
def test_a_redirect_into_private_space_is_refused(client, backend, hostile, loopback_allowed, target):
    response = rest(client, f"{hostile}/redirect?to={target}")
    assert_error(response, 400, "invalid_image", param="image")
    assert not backend.calls


def test_a_redirect_loop_is_cut(client, hostile, loopback_allowed):
    assert_error(rest(client, f"{hostile}/chain/50"), 400, "invalid_image", param="image")


@pytest.mark.parametrize("path", ["/biglength", "/lying", "/chunked", "/close"])
def test_oversized_answers_are_refused_without_reading_them_whole(
    client, backend, hostile, loopback_allowed, path
):
    response = rest(client, f"{hostile}{path}")
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["code"] in ("image_too_large", "source_image_error", "invalid_image")
    assert not backend.calls


def test_a_slow_drip_is_cut_by_the_deadline_not_waited_out(client, backend, hostile, loopback_allowed):
    started = time.monotonic()
    response = node(client, f"{hostile}/drip")
    assert_error(response, 400, "source_image_error", param="source_image")
    assert time.monotonic() - started < 4.5  # the drip would take 5 s; the policy's total is 3 s
    assert not backend.calls


def test_an_error_status_from_the_source_is_a_clear_4xx(client, hostile, loopback_allowed):
    error = assert_error(rest(client, f"{hostile}/missing"), 400, "invalid_image", param="image")
    assert "404" in error["message"]
