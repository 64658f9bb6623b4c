"""Signed webhook delivery: POST the final job object, retried with backoff, every attempt recorded.

Signature scheme (documented in the README with a verification snippet): the receiver gets
``Webhook-Id`` (the job id), ``Webhook-Timestamp`` (unix seconds) and
``Webhook-Signature: v1=<hex>`` where ``hex = HMAC-SHA256(secret, f"{timestamp}." + raw body)``.
Receivers recompute it over the raw body and reject old timestamps (replays). Targets pass the same
SSRF rules as source image URLs: addresses are checked after DNS resolution and pinned.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from inference.errors import InvalidInputError
from serve.fetch import FetchPolicy, check_url, pinned_client

SIGNATURE_HEADER = "Webhook-Signature"
TIMESTAMP_HEADER = "Webhook-Timestamp"
ID_HEADER = "Webhook-Id"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    return "v1=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, tolerance_s: int = 300) -> bool:
    """The receiver's check (also used by our tests): a valid signature on a recent timestamp."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


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

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 1),
        }


def check_webhook_url(url: str, policy: FetchPolicy) -> None:
    """Refuse at submission what delivery would refuse later (scheme, credentials, literal private IPs)."""
    try:
        check_url(httpx.URL(url), policy, param="webhook_url")
    except (httpx.InvalidURL, InvalidInputError) as error:
        message = getattr(error, "message", str(error)).replace("source image URL", "webhook_url")
        raise InvalidInputError(message, code="invalid_webhook_url", param="webhook_url") from None


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
                SIGNATURE_HEADER: sign(secret, timestamp, body),
            }
            status, error = None, None
            try:
                check_url(httpx.URL(url), fetch_policy, "webhook_url")
                async with asyncio.timeout(policy.timeout_s):
                    response = await client.post(url, content=body, headers=headers)
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except TimeoutError:
                error = f"timed out after {policy.timeout_s:g} s"
            except (httpx.HTTPError, InvalidInputError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            result = Attempt(datetime.now(UTC), status, error, (time.perf_counter() - started) * 1000)
            await on_attempt(result)
            if result.ok:
                return True
            if attempt < policy.max_attempts:
                await asyncio.sleep(policy.delay(attempt))
    return False
