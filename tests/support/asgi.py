"""Raw ASGI for tests that must see a client leave mid-response (test clients buffer whole responses)."""

from __future__ import annotations

import asyncio


def http_scope(method: str, path: str, headers: dict[str, str]) -> dict:
    """An HTTP request's ASGI scope from loopback."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


def body_then_disconnect(body: bytes = b""):
    """An ASGI ``receive`` that sends ``body``, then reports the client gone once ``gone`` is set."""
    gone, sent = asyncio.Event(), [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive, gone
