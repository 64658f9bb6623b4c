"""serve.outbound.fetch against a real HTTP server on 127.0.0.1 (loopback only)."""

from __future__ import annotations

import ipaddress
import logging
import time

import httpcore
import pytest

from inference.errors import ImageTooLargeError
from serve.outbound import fetch
from serve.outbound.fetch import FetchPolicy, SourceFetchError, fetch_image, forbidden_reason
from tests.support.hostile_http import PNG, HostileHandler, hostile_server, https_redirecting_client

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
    assert info.value.code == "invalid_image" and info.value.param == "image"


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


NOT_PUBLIC = "'{}' does not resolve to public internet addresses only"


async def test_hostname_resolving_to_private_address_refused(no_network, monkeypatch, caplog):
    fake_dns(monkeypatch, {"evil.example": ["10.0.0.7"]})  # no_network still guards connect_tcp
    with pytest.raises(SourceFetchError, match=NOT_PUBLIC.format("evil.example")) as info:
        await fetch_image("http://evil.example/a.png", policy())
    assert "10.0.0.7" not in str(info.value) and "private" not in str(info.value)  # no DNS oracle
    assert "10.0.0.7 (private)" in caplog.text  # ... the operator still sees it


async def test_any_forbidden_resolved_address_refuses(server, monkeypatch, caplog):
    fake_dns(monkeypatch, {"img.test": ["127.0.0.1", "10.0.0.7"]})
    with pytest.raises(SourceFetchError, match=NOT_PUBLIC.format("img.test")) as info:
        await fetch_image(server.replace("127.0.0.1", "img.test") + "/png", policy())
    assert "10.0.0.7" not in str(info.value) and "10.0.0.7 (private)" in caplog.text


async def test_an_internal_name_and_a_missing_name_get_the_same_answer(no_network, monkeypatch):
    """Finding 5: a refusal must not tell whether an internal name exists or what it resolves to."""

    async def resolve(host, port):
        if host == "db.internal":
            return ["10.20.30.40"]
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(fetch, "resolve_host", resolve)
    messages = []
    for host in ("db.internal", "nothing.internal"):
        with pytest.raises(SourceFetchError) as info:
            await fetch_image(f"http://{host}/a.png", policy())
        messages.append(info.value.message.replace(host, "HOST"))
    assert messages[0] == messages[1], messages


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


async def test_redirect_to_hostname_is_resolved_and_checked(server, monkeypatch, caplog):
    fake_dns(monkeypatch, {"evil.example": ["169.254.169.254"]})
    with pytest.raises(SourceFetchError, match=NOT_PUBLIC.format("evil.example")):
        await fetch_image(f"{server}/redirect?to=http://evil.example/latest/meta-data/", policy())
    assert "169.254.169.254 (link-local (cloud metadata endpoint))" in caplog.text


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


async def test_unreachable_port_is_a_source_fetch_error(caplog):
    caplog.set_level(logging.WARNING, "serve.outbound.fetch")
    with pytest.raises(SourceFetchError, match="could not connect to the source image host") as info:
        await fetch_image("http://127.0.0.1:1/x.png", policy())
    assert info.value.message == "could not connect to the source image host"  # not the library's text
    assert "ConnectError" in caplog.text


# ------------------------------------------------- finding 12: every IANA special-purpose block

SPECIAL_PURPOSE = [
    "fec0::1",  # deprecated site-local (passed as public before)
    "fec0::a:1",
    "feff::1",
    "192.0.0.8",  # IPv4 dummy address (passed as public before)
    "192.0.0.9",  # PCP anycast: reaches the local gateway
    "192.0.0.10",  # TURN anycast
    "192.0.0.170",
    "192.31.196.1",  # AS112
    "192.52.193.1",  # AMT
    "192.88.99.1",  # deprecated 6to4 relay anycast
    "192.175.48.1",  # AS112 direct delegation
    "198.18.0.1",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "240.0.0.1",
    "255.255.255.255",
    "0.1.2.3",
    "100::1",
    "100:0:0:1::1",
    "2001:1::1",
    "2001:2::1",
    "2001:3::1",
    "2001:4:112::1",
    "2001:20::1",
    "2001:30::1",
    "2001:db8::1",
    "2620:4f:8000::1",
    "3fff::1",
    "3ffe::1",
    "5f00::1",
    "64:ff9b:1::1",
    "::808:808",  # deprecated IPv4-compatible
    "64:ff9b::7f00:1",  # NAT64 of loopback
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata endpoint
    "ff05::1",
]


@pytest.mark.parametrize("address", SPECIAL_PURPOSE)
def test_every_special_purpose_block_is_refused(address):
    assert forbidden_reason(ipaddress.ip_address(address), FetchPolicy()) is not None


@pytest.mark.parametrize("address", ["fec0::1", "192.0.0.8"])
async def test_site_local_and_the_dummy_address_are_refused_as_literals(address, no_network):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(SourceFetchError, match=r"forbidden"):
        await fetch_image(f"http://{host}/a.png", policy(allow_networks=()))


async def test_a_name_resolving_into_site_local_space_is_refused(no_network, monkeypatch, caplog):
    fake_dns(monkeypatch, {"v6.example": ["2606:4700::1111", "fec0::5"]})
    with pytest.raises(SourceFetchError, match=NOT_PUBLIC.format("v6.example")):
        await fetch_image("http://v6.example/a.png", policy())
    assert "fec0::5 (deprecated site-local (fec0::/10))" in caplog.text


def test_nat64_of_a_public_address_is_judged_by_that_address():
    assert forbidden_reason(ipaddress.ip_address("64:ff9b::808:808"), FetchPolicy()) is None
    reason = forbidden_reason(ipaddress.ip_address("64:ff9b::a00:1"), FetchPolicy())
    assert reason == "NAT64 wrapper of 10.0.0.1, a private"


async def test_a_redirect_from_https_to_http_is_refused(server, monkeypatch):
    HostileHandler.requests.clear()
    monkeypatch.setattr(
        fetch, "pinned_client", https_redirecting_client(fetch.pinned_client, f"{server}/png")
    )
    with pytest.raises(SourceFetchError, match="from https to plain http"):
        await fetch_image("https://images.example/a.png", policy())
    assert not HostileHandler.requests  # the plain-http target was never contacted


async def test_a_redirect_from_http_to_http_is_still_followed(server, monkeypatch):
    monkeypatch.setattr(
        fetch, "pinned_client", https_redirecting_client(fetch.pinned_client, f"{server}/png")
    )
    assert await fetch_image(f"{server}/redirect?to={server}/png", policy()) == PNG


# ------------------------------------------------- finding 6: IDNA host names


@pytest.mark.parametrize("host", ["xn--n3h.com", "XN--N3H.COM", "img.xn--zz.example", "xn--.com"])
async def test_invalid_idna_hosts_are_refused_without_network(host, no_network):
    with pytest.raises(SourceFetchError, match="not a valid internationalised domain name"):
        await fetch_image(f"http://{host}/a.png", policy())


async def test_a_valid_idna_host_is_resolved_and_fetched(server, monkeypatch):
    fake_dns(monkeypatch, {"xn--mnchen-3ya.example": ["127.0.0.1"]})  # münchen.example
    url = server.replace("127.0.0.1", "xn--mnchen-3ya.example") + "/png"
    assert await fetch_image(url, policy()) == PNG


async def test_a_redirect_to_an_invalid_idna_host_is_refused(server, no_network_after_first_hop):
    with pytest.raises(SourceFetchError, match="not a valid internationalised domain name"):
        await fetch_image(f"{server}/redirect?to=http://xn--n3h.com/a.png", policy())


@pytest.fixture
def no_network_after_first_hop(monkeypatch):
    async def boom(host, port):
        raise AssertionError("the IDNA host was resolved")

    monkeypatch.setattr(fetch, "resolve_host", boom)


# ------------------------------------------------- finding 2: compressed bodies are never decoded


async def test_a_gzip_bomb_is_refused_unread(server):
    HostileHandler.requests.clear()
    with pytest.raises(SourceFetchError, match="Content-Encoding 'gzip'"):
        await fetch_image(f"{server}/gzip", policy(max_bytes=10 * 1024 * 1024))
    assert HostileHandler.requests[-1][2].get("Accept-Encoding") == "identity"


async def test_a_real_image_still_downloads_with_identity_encoding(server):
    HostileHandler.requests.clear()
    assert await fetch_image(f"{server}/png", policy()) == PNG
    assert HostileHandler.requests[-1][2].get("Accept-Encoding") == "identity"


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
