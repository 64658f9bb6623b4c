"""SSRF-safe download of source images that API requests name by URL.

A URL from a request makes *our* server open a connection, so a hostile caller could aim it at the
cloud metadata endpoint, a database on the private network or our own admin ports. We therefore:

* accept only http(s) URLs without userinfo, and refuse literal hosts that are not public addresses
  (including the decimal/octal/hex IPv4 spellings that parsers disagree about);
* resolve every hostname ourselves, refuse it if ANY resolved address is not public, and connect to
  exactly the address we checked (a custom httpcore network backend), so DNS rebinding between the
  check and the connect is impossible; TLS still verifies the certificate against the hostname;
* follow redirects by hand, so each hop gets the same checks;
* cap the body while streaming and bound the whole download by one deadline.

Content type is not checked here: ``inference.images`` sniffs the bytes and rejects non-images.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpcore
import httpx

from inference.errors import ImageTooLargeError, InvalidInputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = {301, 302, 303, 307, 308}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # shared address space: not global, yet not "private"
_METADATA = ipaddress.ip_address("169.254.169.254")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)


class SourceFetchError(InvalidInputError):
    """The source image URL is forbidden, unreachable or answered with an error (the caller's fault)."""

    code = "source_image_error"

    def __init__(self, message: str, *, param: str | None = "image", **kwargs: Any) -> None:
        super().__init__(message, param=param, **kwargs)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one download; ``allow_networks`` lists CIDRs allowed although not public (tests, labs)."""

    max_bytes: int = 10 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0
    max_redirects: int = 3
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allow_networks: tuple[str, ...] = ()
    user_agent: str = "img2img-serve/0.1 (source image fetcher)"
    # allow_networks parsed once, filled in by __post_init__
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"FetchPolicy.max_bytes must be a positive int (bytes), got {self.max_bytes!r}")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"FetchPolicy.{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"FetchPolicy.max_redirects must be an int >= 0, got {self.max_redirects!r}")
        for name in ("allowed_schemes", "allow_networks"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"FetchPolicy.{name} must be a tuple of strings, not one string")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [s for s in self.allowed_schemes if s not in ("http", "https")]
        if not self.allowed_schemes or bad:
            raise ValueError(
                f"FetchPolicy.allowed_schemes must be a non-empty subset of ('http', 'https'), got "
                f"{self.allowed_schemes!r}: other schemes cannot be fetched safely (data: URLs are decoded "
                "by the API layer, not fetched)"
            )
        networks = []
        for cidr in self.allow_networks:
            try:
                networks.append(ipaddress.ip_network(cidr))
            except ValueError as exc:
                raise ValueError(
                    f"FetchPolicy.allow_networks entry {cidr!r} is not a CIDR like '127.0.0.1/32' ({exc})"
                ) from None
        object.__setattr__(self, "networks", tuple(networks))


def forbidden_reason(ip: IPAddress, policy: FetchPolicy) -> str | None:
    """Why ``ip`` must not be fetched from, or None when it is public (or explicitly allowed)."""
    if any(ip.version == net.version and ip in net for net in policy.networks):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is just a.b.c.d on a dual-stack socket
            return forbidden_reason(ip.ipv4_mapped, policy)
        # NAT64 (64:ff9b::/96) needs no unwrapping: Python counts all of ::/8 as reserved.
        embedded = [*(ip.teredo or ()), *([ip.sixtofour] if ip.sixtofour else [])]
        for v4 in embedded:  # tunnels would deliver the packet to the embedded IPv4 address
            if reason := forbidden_reason(v4, policy):
                return f"IPv6 wrapper of {v4}, a {reason}"
    if ip == _METADATA:
        return "link-local (cloud metadata endpoint)"
    for attr in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{attr}"):
            return attr.replace("_", "-")
    if ip in _CGNAT:
        return "shared (CGNAT 100.64.0.0/10)"
    return None if ip.is_global else "non-global"


def _forbidden(host: str, ip: IPAddress, reason: str, param: str | None) -> SourceFetchError:
    return SourceFetchError(
        f"source image host {host!r} is {ip}, a {reason} address; fetching from it is forbidden "
        "(only public internet addresses are allowed)",
        param=param,
    )


def check_url(url: httpx.URL, policy: FetchPolicy, param: str | None = "image") -> None:
    """Reject a URL without touching the network: scheme, userinfo, host spelling and literal IPs."""
    if url.scheme not in policy.allowed_schemes:
        raise SourceFetchError(
            f"source image URL scheme {url.scheme or '(none)'!r} is not allowed; use "
            f"{' or '.join(policy.allowed_schemes)}",
            param=param,
        )
    if url.userinfo:
        raise SourceFetchError("source image URLs must not contain credentials (user:password@)", param=param)
    host = url.host
    if not host:
        raise SourceFetchError("source image URL has no host", param=param)
    if "%" in host:
        raise SourceFetchError(
            f"source image host {host!r} (scoped/percent-encoded) is not allowed", param=param
        )
    if _is_ip(host):
        ip = ipaddress.ip_address(host)
        if reason := forbidden_reason(ip, policy):
            raise _forbidden(host, ip, reason, param)
        return
    name = host.rstrip(".").lower()
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):  # WHATWG: a numeric last label means IPv4
        raise SourceFetchError(
            f"source image host {host!r} is a non-canonical numeric IPv4 address; it is not allowed "
            "(write public addresses as a dotted quad like 93.184.216.34)",
            param=param,
        )
    if name == "localhost" or name.endswith(".localhost"):
        raise SourceFetchError(f"source image host {host!r} is loopback; it is forbidden", param=param)
    # Any other DNS name is checked after resolution, in _PinnedBackend.connect_tcp.


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (module-level so tests can substitute a fake DNS)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, validates, then connects to the validated IP itself, so DNS can't change in between.

    httpcore hands us the URL's hostname; TLS (``start_tls``) still receives that hostname as
    ``server_hostname``, so SNI and certificate verification are unaffected by connecting to an IP.
    """

    def __init__(self, policy: FetchPolicy, param: str | None) -> None:
        self._policy, self._param, self._inner = policy, param, httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kw: Any):
        try:
            literal = [host] if _is_ip(host) else None  # no DNS for literals (checked the same way)
            addresses = [ipaddress.ip_address(a) for a in literal or await resolve_host(host, port)]
        except OSError as exc:
            message = f"could not resolve source image host {host!r}: {exc}"
            raise SourceFetchError(message, param=self._param) from None
        if not addresses:
            raise SourceFetchError(f"source image host {host!r} has no addresses", param=self._param)
        for ip in addresses:  # one bad address is enough: we must not let DNS choose for us
            if reason := forbidden_reason(ip, self._policy):
                raise _forbidden(host, ip, reason, self._param)
        error: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout=timeout, **kw)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error  # type: ignore[misc]

    async def connect_unix_socket(self, *args: Any, **kwargs: Any):
        raise SourceFetchError("unix sockets are never used for source images", param=self._param)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Loading the CA bundle takes ~0.1 s, so every fetch shares one verifying context."""
    return httpx.create_ssl_context(trust_env=False)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (exception mapping, streaming) with its pool swapped for a pinned one.

    httpx 0.28 has no ``network_backend`` argument, so we replace ``_pool`` with an httpcore pool built
    through httpcore's public constructor; ``handle_async_request`` only uses ``self._pool``.
    """

    def __init__(self, policy: FetchPolicy, param: str | None) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=4,
            network_backend=_PinnedBackend(policy, param),
        )


def pinned_client(policy: FetchPolicy, param: str | None = "image", **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client whose every connection goes to a checked, pinned address (webhooks use it too).

    It never follows redirects by itself and ignores proxy variables; callers run ``check_url`` on
    each URL first so schemes, credentials and literal addresses are refused before any I/O.
    """
    timeout = httpx.Timeout(policy.read_timeout_s, connect=policy.connect_timeout_s)
    return httpx.AsyncClient(
        transport=_PinnedTransport(policy, param),
        timeout=timeout,
        trust_env=False,
        follow_redirects=False,
        **kwargs,
    )


async def fetch_image(url: str, policy: FetchPolicy, *, param: str = "image") -> bytes:
    """Download ``url`` under ``policy``; raise SourceFetchError / ImageTooLargeError (both 4xx)."""
    headers = {"User-Agent": policy.user_agent, "Accept": "image/*", "Accept-Encoding": "identity"}
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise SourceFetchError(f"source image URL is malformed: {exc}", param=param) from None
    try:
        # The deadline sits inside the client so closing the connections is not itself cancelled.
        async with pinned_client(policy, param) as client:
            with anyio.fail_after(policy.total_timeout_s):
                for _ in range(policy.max_redirects + 1):
                    check_url(current, policy, param)
                    async with client.stream("GET", current, headers=headers) as response:
                        location = response.headers.get("location")
                        if response.status_code in _REDIRECTS and location:
                            current = current.join(location)
                            continue
                        if not response.is_success:
                            raise SourceFetchError(
                                f"source image URL answered HTTP {response.status_code} "
                                f"{response.reason_phrase}".rstrip(),
                                param=param,
                            )
                        return await _read_capped(response, policy, param)
                raise SourceFetchError(
                    f"source image URL redirected more than {policy.max_redirects} times", param=param
                )
    except TimeoutError:
        raise SourceFetchError(
            f"source image download did not finish within {policy.total_timeout_s:g} s", param=param
        ) from None
    except httpx.TimeoutException as exc:
        raise SourceFetchError(
            f"source image download timed out ({type(exc).__name__})", param=param
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise SourceFetchError(f"could not fetch the source image: {exc}", param=param) from None


async def _read_capped(response: httpx.Response, policy: FetchPolicy, param: str) -> bytes:
    """Read the raw body, stopping as soon as it exceeds ``max_bytes`` (Content-Length is only a hint)."""

    def too_large(size: str) -> ImageTooLargeError:
        return ImageTooLargeError(
            f"source image is larger than the {policy.max_bytes} byte limit ({size})", param=param
        )

    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise too_large(f"Content-Length {declared}")
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":  # decoding would let a tiny gzip bomb expand past our cap in one chunk
        raise SourceFetchError(f"source image was sent with Content-Encoding {encoding!r}", param=param)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise too_large("body exceeded it while streaming")
    return bytes(body)
