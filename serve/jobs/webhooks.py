"""Signed webhook delivery: POST the final job object, retried with backoff, every attempt recorded.

Signature scheme: Standard Webhooks (https://www.standardwebhooks.com), signed with the
``standardwebhooks`` package itself so any receiver's library verifies it: ``webhook-id`` (the job
id, the same on every retry, for de-duplication), ``webhook-timestamp`` (unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{raw body}">``. Receivers verify with
``Webhook(secret).verify(raw_body, headers)`` (it rejects old timestamps) and check the body's
``tenant`` field. Every tenant signs with its own secret (``webhook_secret_for``): one stored in the
tenant (the admin CLI issues and rotates it), else one derived from the server key
``IMG2IMG_WEBHOOK_SECRET`` (``derive_webhook_secret``). The server key itself signs only when the
operator opts in (``webhooks.shared_secret: true``). Targets pass the same SSRF rules as source image
URLs: addresses are checked after DNS resolution and pinned.

Transport rules: targets must be https unless the operator sets ``webhooks.allow_plain_http`` (or the
target is a literal address in ``fetch.allow_networks``, a lab); redirects are never followed (a 3xx
is a failed attempt); only the status line and headers of the answer are read: the body is neither
read nor decoded (we ask for ``identity`` anyway), so a receiver answering with a gzip bomb costs us
nothing. Attempt records carry a stable ``code`` and message; details go to the log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import idna
from standardwebhooks import Webhook

from inference.errors import InvalidInputError
from serve.observability.log_redaction import redact
from serve.outbound.fetch import FetchPolicy, check_url, pinned_client, transport_error

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "webhook-signature"
TIMESTAMP_HEADER = "webhook-timestamp"
ID_HEADER = "webhook-id"


DERIVATION_LABEL = b"img2img-webhook-secret\n"
NO_SECRET = (
    "no webhook secret for this tenant: set IMG2IMG_WEBHOOK_SECRET (per-tenant secrets are derived "
    "from it), or give a stored tenant its own with `img2img-admin rotate-webhook-secret TENANT`"
)


def derive_webhook_secret(server_key: bytes, tenant: str) -> str:
    """The webhook secret of a tenant that stores none (environment and config tenants): an HMAC of
    its name under the server key. Distinct per tenant, stable across restarts and replicas, and
    printable by the admin CLI (``show-webhook-secret``); one tenant's secret reveals no other's."""
    return "whsec_" + hmac.new(server_key, DERIVATION_LABEL + tenant.encode(), hashlib.sha256).hexdigest()


def webhook_secret_for(
    tenant: str, stored_secret: str | None, server_key: bytes | None, *, shared: bool = False
) -> bytes | None:
    """The key that signs ``tenant``'s deliveries: its stored secret, else one derived from the server
    key, else (``shared``, an explicit operator opt-in) the server key itself. None: cannot sign."""
    if stored_secret:
        return stored_secret.encode()
    if server_key is None:
        return None
    return server_key if shared else derive_webhook_secret(server_key, tenant).encode()


def webhook_payload(job: dict[str, Any], tenant: str) -> dict[str, Any]:
    """What is signed and sent: the job object plus the tenant it belongs to, so a receiver can check
    that a delivery is for it even where secrets are shared."""
    return {**job, "tenant": tenant}


def standard_secret(secret: bytes) -> str:
    """The Standard Webhooks form (``whsec_`` + base64) of a signing secret, as receivers configure it.

    Issued and derived secrets already are (issued ones in the URL-safe alphabet before this scheme:
    the same bytes, spelled with ``-``/``_``, are mapped to ``+``/``/``). The server key itself (shared
    mode) is arbitrary text: its bytes are base64-encoded."""
    text = secret.decode()
    if text.startswith("whsec_"):
        return "whsec_" + text.removeprefix("whsec_").replace("-", "+").replace("_", "/")
    return "whsec_" + base64.b64encode(secret).decode()


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` over ``{id}.{timestamp}.{body}``, by the package receivers verify with."""
    return Webhook(standard_secret(secret)).sign(
        message_id, datetime.fromtimestamp(timestamp, UTC), body.decode()
    )


@dataclass(frozen=True)
class WebhookPolicy:
    max_attempts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    timeout_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff before attempt ``attempt + 1`` (1 s, 2 s, 4 s, ... capped)."""
        return min(self.first_delay_s * 2 ** (attempt - 1), self.max_delay_s)


@dataclass(frozen=True)
class Attempt:
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    #: stable kind of failure: http_status, target_refused, connect_failed, timeout, protocol_error,
    #: internal_error, no_secret
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "status_code": self.status_code,
            "code": self.code,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 1),
        }


def check_webhook_url(url: str, policy: FetchPolicy) -> None:
    """Refuse at submission what delivery would refuse later (scheme, credentials, literal private IPs)."""
    try:
        check_target(httpx.URL(url), policy)
    except (httpx.InvalidURL, InvalidInputError) as error:
        message = getattr(error, "message", str(error))
        raise InvalidInputError(message, code="invalid_webhook_url", param="webhook_url") from None


def check_target(url: httpx.URL, policy: FetchPolicy) -> None:
    """The SSRF rules of ``check_url`` plus the plain-http policy (no network)."""
    check_url(url, policy, "webhook_url")
    if url.scheme == "http" and not policy.allow_plain_http_webhooks and not _lab_address(url, policy):
        raise InvalidInputError(
            "webhook_url must be an https URL: deliveries carry signed results and image links, and this "
            "service does not send them over plain http",
            code="invalid_webhook_url",
            param="webhook_url",
        )


def _lab_address(url: httpx.URL, policy: FetchPolicy) -> bool:
    """A literal address inside ``allow_networks``: the operator named that network (tests, labs)."""
    try:
        ip = ipaddress.ip_address(url.raw_host.decode("ascii"))
    except (ValueError, UnicodeError):
        return False
    return any(ip.version == net.version and ip in net for net in policy.networks)


async def deliver(
    url: str,
    payload: dict[str, Any],
    secret: bytes,
    fetch_policy: FetchPolicy,
    policy: WebhookPolicy,
    on_attempt: Callable[[Attempt], Awaitable[None]],
    *,
    event_id: str,
) -> bool:
    """POST ``payload`` until a 2xx or ``max_attempts``; ``on_attempt`` records each try.

    Returns True once a target accepted it."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    async with pinned_client(fetch_policy, "webhook_url") as client:
        for attempt in range(1, policy.max_attempts + 1):
            started = time.perf_counter()
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                ID_HEADER: event_id,
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(secret, event_id, timestamp, body),
            }
            status, code, error = None, None, None
            try:
                status = await post_status(client, url, body, headers, fetch_policy, policy.timeout_s)
                if not 200 <= status < 300:
                    code = "http_status"
                    redirect = " (redirects are not followed)" if 300 <= status < 400 else ""
                    error = f"HTTP {status}{redirect}"
            except Exception as exc:  # every failure is an attempt: recorded generically, logged in full
                code, error = _failure(exc, policy.timeout_s)
                logger.warning(
                    "webhook %s attempt %d to host %r failed (%s): %s",
                    event_id,
                    attempt,
                    _host(url),
                    code,
                    redact(f"{type(exc).__name__}: {exc}")[:500],
                )
                if code == "internal_error":
                    logger.exception("webhook %s: unexpected delivery failure", event_id)
            result = Attempt(datetime.now(UTC), status, error, (time.perf_counter() - started) * 1000, code)
            await on_attempt(result)
            if result.ok:
                return True
            if attempt < policy.max_attempts:
                await asyncio.sleep(policy.delay(attempt))
    return False


#: httpx asks for gzip by default; we never decode the answer, and ask the receiver not to compress.
_TRANSPORT_HEADERS = {"Accept-Encoding": "identity"}


async def post_status(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    fetch_policy: FetchPolicy,
    timeout_s: float,
) -> int:
    """POST once and return the status code; the response body is never read or decoded.

    Leaving the ``stream`` block closes the response unread, which makes httpcore drop the connection
    instead of draining it, so the receiver's body (a gzip bomb, an endless stream) never reaches us.
    """
    check_target(httpx.URL(url), fetch_policy)
    async with asyncio.timeout(timeout_s):
        request_headers = {**headers, **_TRANSPORT_HEADERS}
        async with client.stream("POST", url, content=body, headers=request_headers) as response:
            return response.status_code


def _failure(exc: BaseException, timeout_s: float) -> tuple[str, str]:
    """(code, message) for an attempt record: stable text that never names addresses or hosts."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout", f"timed out after {timeout_s:g} s"
    if isinstance(exc, idna.IDNAError):  # httpx parses a 3xx's Location even when not following it
        return "protocol_error", "the webhook target answered with an unusable redirect (not followed)"
    if isinstance(exc, InvalidInputError):  # SSRF rules, plain http, a malformed or refused target
        return "target_refused", "the webhook target is not allowed (public https hosts only)"
    if isinstance(exc, httpx.InvalidURL | UnicodeError | ValueError):
        return "target_refused", "the webhook target URL is not valid"
    if isinstance(exc, httpx.HTTPError):
        code = "connect_failed" if isinstance(exc, httpx.ConnectError) else "protocol_error"
        return code, transport_error(exc, "webhook target", "webhook_url").message
    return "internal_error", "the delivery failed on our side"


def _host(url: str) -> str:
    try:
        return httpx.URL(url).raw_host.decode("ascii", "replace")
    except (httpx.InvalidURL, TypeError):
        return "(invalid URL)"
