"""SSRF-safe download of source images that API requests name by URL.

A URL from a request makes *our* server open a connection, so a hostile caller could aim it at the
cloud metadata endpoint, a database on the private network or our own admin ports. We therefore:

* accept only http(s) URLs without userinfo, and refuse literal hosts that are not public addresses
  (including the decimal/octal/hex IPv4 spellings that parsers disagree about);
* resolve every hostname ourselves, refuse it if ANY resolved address is not public, and connect to
  exactly the address we checked (a custom httpcore network backend), so DNS rebinding between the
  check and the connect is impossible; TLS still verifies the certificate against the hostname;
* follow redirects by hand, so each hop gets the same checks, and never from https down to http;
* ask for the identity encoding, never decode a compressed body, cap the raw body while streaming and
  bound the whole download by one deadline (a 0.5 MB gzip of zeros would inflate to 500 MB).

"Public" means outside every block of IANA's IPv4 and IPv6 special-purpose registries (and multicast
and the deprecated blocks those registries dropped); translation and tunnel prefixes (mapped, NAT64,
6to4, Teredo) are judged by the IPv4 address they carry. Refusals of a *literal* address say why (the
caller wrote it); refusals of a *name* never say what it resolved to (that would make us a DNS oracle
for the private network): the details go to our log, the caller gets one stable message.

Content type is not checked here: ``inference.images`` sniffs the bytes and rejects non-images.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpcore
import httpx
import idna

from inference.errors import ImageTooLargeError, InvalidImageError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = {301, 302, 303, 307, 308}
_METADATA = ipaddress.ip_address("169.254.169.254")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: carries an IPv4 address
#: Every block of the IANA IPv4 and IPv6 Special-Purpose Address Registries (as of 2026), each refused
#: whole, including the few entries IANA marks globally reachable (PCP/TURN/DNS-SD anycast reach the
#: local gateway; AS112, AMT, ORCHIDv2 and DRIP serve no web content), plus multicast and blocks the
#: registries no longer list but which are still not public: site-local fec0::/10 (deprecated by
#: RFC 3879, yet routers may still route it internally), 6bone 3ffe::/16 and IPv4-compatible ::/96.
#: Python's ``ipaddress`` flags are checked too, but differ between Python releases, so they are only
#: a second net. Translation prefixes that embed an IPv4 address are unwrapped before this table.
_SPECIAL: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT 100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment (192.0.0.0/24)"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.31.196.0/24", "AS112 (192.31.196.0/24)"),
        ("192.52.193.0/24", "AMT (192.52.193.0/24)"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast (192.88.99.0/24)"),
        ("192.168.0.0/16", "private"),
        ("192.175.48.0/24", "AS112 direct delegation (192.175.48.0/24)"),
        ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "deprecated IPv4-compatible (::/96)"),
        ("::/8", "reserved (::/8)"),
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
        ("100::/64", "discard-only (100::/64)"),
        ("100:0:0:1::/64", "dummy (100:0:0:1::/64)"),
        ("2001::/23", "IETF protocol assignment (2001::/23)"),
        ("2001:db8::/32", "documentation (2001:db8::/32)"),
        ("2620:4f:8000::/48", "AS112 direct delegation (2620:4f:8000::/48)"),
        ("3fff::/20", "documentation (3fff::/20)"),
        ("3ffe::/16", "former 6bone (3ffe::/16)"),
        ("5f00::/16", "SRv6 SID (5f00::/16)"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "deprecated site-local (fec0::/10)"),
        ("ff00::/8", "multicast"),
    )
)


class SourceFetchError(InvalidImageError):
    """The source image URL is forbidden, unreachable or answered with an error (the caller's fault)."""

    code = "invalid_image"  # the node API renames it source_image_error (serve.api.node.DIALECT)

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
    # Webhook targets only (serve.jobs.webhooks): plain-http targets are refused unless this is set (the
    # operator's ``webhooks.allow_plain_http``) or the target is a literal address in allow_networks.
    allow_plain_http_webhooks: bool = False
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
        if ip in _MAPPED:  # ::ffff:a.b.c.d is just a.b.c.d on a dual-stack socket
            return forbidden_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), policy)
        if ip in _NAT64:  # the NAT64 gateway forwards to the embedded address: judge that one
            v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            reason = forbidden_reason(v4, policy)
            return f"NAT64 wrapper of {v4}, a {reason}" if reason else None
        embedded = [*(ip.teredo or ()), *([ip.sixtofour] if ip.sixtofour else [])]
        for v4 in embedded:  # tunnels would deliver the packet to the embedded IPv4 address
            if reason := forbidden_reason(v4, policy):
                return f"IPv6 wrapper of {v4}, a {reason}"
    if ip == _METADATA:
        return "link-local (cloud metadata endpoint)"
    for network, reason in _SPECIAL:
        if ip.version == network.version and ip in network:
            return reason
    for attr in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{attr}"):
            return attr.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour:
        return None  # 6to4 of a public IPv4 address (checked above); Python calls 2002::/16 non-global
    return None if ip.is_global else "non-global"


def _noun(param: str | None) -> str:
    return "webhook_url" if param == "webhook_url" else "source image URL"


def _forbidden(host: str, ip: IPAddress, reason: str, param: str | None) -> SourceFetchError:
    """A literal address the caller wrote: saying why it is refused tells them nothing new."""
    return SourceFetchError(
        f"{_noun(param)} host {host!r} is {ip}, a {reason} address; it is forbidden "
        "(only public internet addresses are allowed)",
        param=param,
    )


def not_public(host: str, param: str | None) -> SourceFetchError:
    """One message for every name that does not resolve to public addresses only (no DNS oracle)."""
    return SourceFetchError(
        f"{_noun(param)} host {host!r} does not resolve to public internet addresses only; it is "
        "forbidden (only public internet hosts are allowed)",
        param=param,
    )


def _ascii_host(url: httpx.URL, param: str | None) -> str:
    """The host as sent on the wire (A-labels), refusing names that are not valid IDNA.

    ``httpx.URL.host`` decodes ``xn--`` names and raises a bare ``idna`` error (a 500 if unhandled) on
    invalid ones such as ``xn--n3h.com`` (a snowman, not allowed by IDNA 2008): refuse them clearly.
    """
    host = url.raw_host.decode("ascii", "replace")
    for label in host.rstrip(".").split("."):
        if label[:4].lower() == "xn--":
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError, ValueError):
                raise SourceFetchError(
                    f"{_noun(param)} host {host!r} is not a valid internationalised domain name "
                    f"(label {label!r} is not valid IDNA 2008)",
                    param=param,
                ) from None
    return host


def check_url(url: httpx.URL, policy: FetchPolicy, param: str | None = "image") -> None:
    """Reject a URL without touching the network: scheme, userinfo, host spelling and literal IPs."""
    what = _noun(param)
    if url.scheme not in policy.allowed_schemes:
        raise SourceFetchError(
            f"{what} scheme {url.scheme or '(none)'!r} is not allowed; use "
            f"{' or '.join(policy.allowed_schemes)}",
            param=param,
        )
    if url.userinfo:
        raise SourceFetchError(f"{what}s must not contain credentials (user:password@)", param=param)
    host = _ascii_host(url, param)
    if not host:
        raise SourceFetchError(f"{what} has no host", param=param)
    if "%" in host:
        raise SourceFetchError(f"{what} host {host!r} (scoped/percent-encoded) is not allowed", param=param)
    if _is_ip(host):
        ip = ipaddress.ip_address(host)
        if reason := forbidden_reason(ip, policy):
            raise _forbidden(host, ip, reason, param)
        return
    name = host.rstrip(".").lower()
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):  # WHATWG: a numeric last label means IPv4
        raise SourceFetchError(
            f"{what} host {host!r} is a non-canonical numeric IPv4 address; it is not allowed "
            "(write public addresses as a dotted quad like 93.184.216.34)",
            param=param,
        )
    if name == "localhost" or name.endswith(".localhost"):
        raise SourceFetchError(f"{what} host {host!r} is loopback; it is forbidden", param=param)
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
        if _is_ip(host):  # no DNS for literals (check_url judged them already; judged again here)
            ip = ipaddress.ip_address(host)
            if reason := forbidden_reason(ip, self._policy):
                raise _forbidden(host, ip, reason, self._param)
            addresses = [ip]
        else:  # a name: the caller learns only "not public", whatever DNS said (no DNS oracle)
            try:
                addresses = [ipaddress.ip_address(a) for a in await resolve_host(host, port)]
            except (OSError, ValueError) as exc:
                logger.warning("refused %s host %r: it does not resolve (%s)", self._param, host, exc)
                raise not_public(host, self._param) from None
            bad = [(ip, r) for ip in addresses if (r := forbidden_reason(ip, self._policy))]
            if bad or not addresses:  # one bad address is enough: we must not let DNS choose for us
                found = ", ".join(f"{ip} ({r})" for ip, r in bad) or "no addresses"
                logger.warning("refused %s host %r: it resolves to %s", self._param, host, found)
                raise not_public(host, self._param)
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
    host = current.raw_host.decode("ascii", "replace")
    try:
        # The deadline sits inside the client so closing the connections is not itself cancelled.
        async with pinned_client(policy, param) as client:
            with anyio.fail_after(policy.total_timeout_s):
                for _ in range(policy.max_redirects + 1):
                    check_url(current, policy, param)
                    host = current.raw_host.decode("ascii", "replace")
                    async with client.stream("GET", current, headers=headers) as response:
                        location = response.headers.get("location")
                        if response.status_code in _REDIRECTS and location:
                            current = _redirect_target(current, location, param)
                            continue  # leaving the block closes the response unread
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
    except UnicodeError as exc:
        # httpx builds the next request of every 3xx itself (even with follow_redirects off) and its
        # ``URL.host`` raises idna's errors on an invalid ``xn--`` Location: a 4xx, not a crash.
        logger.warning("source image host %r sent an unusable answer: %s", host, exc)
        raise SourceFetchError(
            "source image URL redirected to a host that is not a valid internationalised domain name"
            if isinstance(exc, idna.IDNAError)
            else "the source image host sent an answer that cannot be parsed",
            param=param,
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        # The library's text can name the address it dialled: log it, tell the caller the kind only.
        logger.warning("source image fetch from host %r failed: %s: %s", host, type(exc).__name__, exc)
        raise transport_error(exc, "source image host", param) from None


def transport_error(exc: Exception, what: str, param: str | None) -> SourceFetchError:
    """A stable message for an httpx failure, by kind (never the library's text)."""
    if isinstance(exc, httpx.ConnectError):
        message = f"could not connect to the {what}"
    elif isinstance(exc, httpx.TimeoutException):
        message = f"the {what} timed out"
    else:
        message = f"the {what} broke the HTTP exchange ({type(exc).__name__})"
    return SourceFetchError(message, param=param)


def _redirect_target(current: httpx.URL, location: str, param: str) -> httpx.URL:
    """The next hop of a redirect: a parsable URL that does not downgrade https to plain http."""
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise SourceFetchError(
            "source image URL redirected to a malformed URL (invalid Location header)", param=param
        ) from None
    if current.scheme == "https" and target.scheme == "http":
        raise SourceFetchError(
            "source image URL redirected from https to plain http; downgrades are refused "
            "(the redirect target would travel unencrypted)",
            param=param,
        )
    return target


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
