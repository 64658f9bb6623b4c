"""A request-body cap that counts the bytes actually received, not the bytes a client declares.

Checking ``Content-Length`` alone lets a chunked upload (no Content-Length) or a lying one stream
any amount into the JSON or multipart parser. This ASGI middleware wraps the ``receive`` channel:
a declared length over the cap is refused before the first byte is read, and a body that grows past
the cap is refused at the chunk that crosses it, so nothing beyond the cap is ever buffered.

The refusal is raised from ``receive`` as an ``HTTPException`` (413): FastAPI re-raises those from
its body parsing unchanged, so the app's own handler renders it in the calling API's error envelope.
Starlette 1.x ships ``max_body_size``, but its limiter rewrites every response to a request with an
over-large Content-Length into plain text, outside any API's envelope.

Behind Ray Serve this runs in the ingress replica. Serve 2.60's HTTP proxy reads each request body
into an unbounded per-request queue (``proxy_asgi_receive``) and has no size setting; it stops once
our 413 ends the request, but a hard cap in front of the proxy belongs to the load balancer.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class PayloadTooLargeError(HTTPException):
    """The request body exceeds the cap (HTTP 413)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {describe_size(max_bytes)}")


def describe_size(size: int) -> str:
    """``16 MB`` for whole mebibytes, otherwise the exact byte count."""
    mib = 1024 * 1024
    return f"{size // mib} MB" if size >= mib and size % mib == 0 else f"{size} bytes"


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimitMiddleware:
    """Refuse HTTP request bodies larger than ``max_bytes`` while they are being read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise PayloadTooLargeError(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
