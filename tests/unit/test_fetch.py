"""serve.fetch against a real HTTP server on 127.0.0.1 (loopback only; nothing else is ever contacted)."""

from __future__ import annotations

import ipaddress
import time

import httpcore
import pytest

from inference.errors import ImageTooLargeError
from serve import fetch
from serve.fetch import FetchPolicy, SourceFetchError, fetch_image, forbidden_reason
from tests.support.hostile_http import PNG, HostileHandler, hostile_server

pytestmark = pytest.mark.anyio

LOOPBACK = ("127.0.0.1/32",)
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server():
    with hostile_server() as url:
        yield url


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if fetch tries to resolve or connect: the refusal must come from validation."""

    async def boom(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(fetch, "resolve_host", boom)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", boom)


def fake_dns(monkeypatch, table: dict[str, list[str]]) -> None:
    async def resolve(host, port):
        return table[host]

    monkeypatch.setattr(fetch, "resolve_host", resolve)


def policy(**overrides) -> FetchPolicy:
    values = {"max_bytes": LIMIT, "read_timeout_s": 3, "total_timeout_s": 5, "allow_networks": LOOPBACK}
    return FetchPolicy(**{**values, **overrides})


async def test_png_downloads_from_allowlisted_loopback(server):
    assert await fetch_image(f"{server}/png", policy()) == PNG


async def test_loopback_refused_without_allowlist_before_connecting(server, no_network):
    with pytest.raises(SourceFetchError, match=r"loopback.*forbidden") as info:
        await fetch_image(f"{server}/png", policy(allow_networks=()))
    assert info.value.code == "source_image_error" and info.value.param == "image"


async def test_param_can_be_overridden(no_network):
    with pytest.raises(SourceFetchError) as info:
        await fetch_image("http://10.0.0.1/x.png", policy(), param="mask_image")
    assert info.value.param == "mask_image"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.2",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "[fe80::1]",
        "[fc00::1]",
        "[2002:a00:1::]",
        "[64:ff9b::a00:1]",
        "224.0.0.1",
        "2130706433",
        "0x7f.0.0.1",
        "0x7f.1",
        "017700000001",
        "127.1",
        "LOCALHOST.",
        "api.localhost",
    ],
)
async def test_forbidden_literal_hosts_refused_without_network(host, no_network):
    with pytest.raises(SourceFetchError, match=r"forbidden|not allowed"):
        await fetch_image(f"http://{host}:8080/x.png", policy(allow_networks=()))


async def test_ipv4_mapped_loopback_follows_the_ipv4_allowlist(no_network):
    assert forbidden_reason(ipaddress.ip_address("::ffff:127.0.0.1"), policy()) is None
    assert forbidden_reason(ipaddress.ip_address("::ffff:127.0.0.1"), policy(allow_networks=())) == "loopback"


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert forbidden_reason(ipaddress.ip_address(address), FetchPolicy()) is None


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://x/a.png",
        "gopher://x/",
        "javascript:alert(1)",
        "data:image/png;base64,AA==",
    ],
)
async def test_other_schemes_refused(url, no_network):
    with pytest.raises(SourceFetchError, match="scheme"):
        await fetch_image(url, policy())


@pytest.mark.parametrize("url", ["http:///x.png", "http://[zz/", "not a url"])
async def test_malformed_urls_refused(url, no_network):
    with pytest.raises(SourceFetchError):
        await fetch_image(url, policy())


async def test_userinfo_refused(server, no_network):
    with pytest.raises(SourceFetchError, match="credentials"):
        await fetch_image(server.replace("://", "://user:pw@") + "/png", policy())


async def test_hostname_resolving_to_private_address_refused(no_network, monkeypatch):
    fake_dns(monkeypatch, {"evil.example": ["10.0.0.7"]})  # no_network still guards connect_tcp
    with pytest.raises(SourceFetchError, match=r"'evil.example' is 10\.0\.0\.7, a private address"):
        await fetch_image("http://evil.example/a.png", policy())


async def test_any_forbidden_resolved_address_refuses(server, monkeypatch):
    fake_dns(monkeypatch, {"img.test": ["127.0.0.1", "10.0.0.7"]})
    with pytest.raises(SourceFetchError, match=r"10\.0\.0\.7"):
        await fetch_image(server.replace("127.0.0.1", "img.test") + "/png", policy())


async def test_connection_goes_to_the_validated_ip_with_hostname_kept(server, monkeypatch):
    # The system resolver knows nothing of img.test: success proves we dial the address we checked.
    fake_dns(monkeypatch, {"img.test": ["127.0.0.1"]})
    HostileHandler.hosts.clear()
    url = server.replace("127.0.0.1", "img.test") + "/png"
    assert await fetch_image(url, policy()) == PNG
    assert HostileHandler.hosts == [url.split("/")[2]]


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/png", "http://localhost:{port}/png"])
async def test_redirect_into_forbidden_address_refused(server, target):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(SourceFetchError, match="forbidden"):
        await fetch_image(f"{server}/redirect?to={target.format(port=port)}", policy())


async def test_redirect_to_hostname_is_resolved_and_checked(server, monkeypatch):
    fake_dns(monkeypatch, {"evil.example": ["169.254.169.254"]})
    with pytest.raises(SourceFetchError, match="metadata"):
        await fetch_image(f"{server}/redirect?to=http://evil.example/latest/meta-data/", policy())


async def test_redirect_scheme_is_rechecked(server):
    with pytest.raises(SourceFetchError, match="scheme 'file'"):
        await fetch_image(f"{server}/redirect?to=file:///etc/passwd", policy())


async def test_redirects_within_limit_are_followed(server):
    assert await fetch_image(f"{server}/chain/3", policy(max_redirects=3)) == PNG


async def test_too_many_redirects_refused(server):
    with pytest.raises(SourceFetchError, match="more than 3 times"):
        await fetch_image(f"{server}/chain/4", policy(max_redirects=3))


async def test_declared_content_length_over_limit_refused_before_body(server):
    with pytest.raises(ImageTooLargeError, match="Content-Length 1000000000") as info:
        await fetch_image(f"{server}/biglength", policy())
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize("path", ["/chunked", "/close"])
async def test_body_without_content_length_is_capped_while_streaming(server, path):
    started = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="while streaming"):
        await fetch_image(server + path, policy())
    assert time.monotonic() - started < 2


async def test_lying_small_content_length_cannot_push_more(server):
    # HTTP/1.1 framing stops at the declared length, so the extra 2 MiB never reaches the caller.
    body = await fetch_image(f"{server}/lying", policy())
    assert len(body) == 100


async def test_404_is_a_source_fetch_error(server):
    with pytest.raises(SourceFetchError, match="HTTP 404"):
        await fetch_image(f"{server}/missing.png", policy())


async def test_slow_drip_is_cut_by_the_total_deadline(server):
    started = time.monotonic()
    with pytest.raises(SourceFetchError, match="within 1 s"):
        await fetch_image(f"{server}/drip", policy(total_timeout_s=1, read_timeout_s=10))
    assert time.monotonic() - started < 2


async def test_unreachable_port_is_a_source_fetch_error():
    with pytest.raises(SourceFetchError, match="could not fetch"):
        await fetch_image("http://127.0.0.1:1/x.png", policy())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"total_timeout_s": -1}, "total_timeout_s"),
        ({"max_redirects": -1}, "max_redirects"),
        ({"allowed_schemes": ("http", "ftp")}, "cannot be fetched safely"),
        ({"allow_networks": "127.0.0.1/32"}, "not one string"),
        ({"allow_networks": ("127.0.0.1/8",)}, "not a CIDR"),
    ],
)
def test_policy_validation_teaches(overrides, message):
    with pytest.raises(ValueError, match=message):
        FetchPolicy(**overrides)
