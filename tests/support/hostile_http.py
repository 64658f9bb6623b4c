"""A hostile HTTP server on 127.0.0.1 for the SSRF tests: redirects, lies about sizes, drips bytes,
answers with gzip bombs (GET and POST, so it also serves as a hostile webhook receiver).

Shared by serve.outbound.fetch's own tests and the HTTP-level SSRF suite; it only ever listens on loopback and
every slow answer is bounded (a few seconds at most, even if nobody hangs up).
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
from PIL import Image

BIG = 2 * 1024 * 1024  # what the hostile endpoints try to push


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
BOMB_INFLATED = 32 * 1024 * 1024  # the tests' bomb: 32 MiB of zeros in a ~32 KB gzip


@functools.cache
def gzip_bomb(inflated: int = BOMB_INFLATED) -> bytes:
    """A gzip member of ``inflated`` zero bytes (~1/1000 of that on the wire), built 1 MiB at a time."""
    packer, chunk = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)
    parts = [
        packer.compress(chunk[: min(len(chunk), inflated - done)]) for done in range(0, inflated, len(chunk))
    ]
    return b"".join([*parts, packer.flush()])


class HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hosts: list[str] = []  # noqa: RUF012 - Host headers seen, for the DNS-pinning test
    requests: list[tuple[str, str, dict[str, str]]] = []  # noqa: RUF012 - (method, path, headers) seen

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def handle(self):
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up on purpose
            super().handle()

    def do_GET(self):
        HostileHandler.hosts.append(self.headers.get("Host", ""))
        HostileHandler.requests.append(("GET", self.path, dict(self.headers)))
        url = urlsplit(self.path)
        self._route(url.path, parse_qs(url.query))

    def do_POST(self):  # a hostile webhook receiver: same routes, the request body is read and dropped
        HostileHandler.requests.append(("POST", self.path, dict(self.headers)))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        self._route(url.path, parse_qs(url.query))

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        if path == "/png":
            self._send(200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, PNG)
        elif path == "/redirect":
            self._send(302, {"Location": query["to"][0], "Content-Length": "0"})
        elif path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])  # /chain/N answers after exactly N redirects
            if left == 0:
                return self._route("/png", query)
            self._send(302, {"Location": f"/chain/{left - 1}", "Content-Length": "0"})
        elif path == "/lying":  # claims 100 bytes, sends 2 MiB
            self._send(200, {"Content-Length": "100"}, b"\0" * BIG)
        elif path == "/chunked":
            self._send(200, {"Transfer-Encoding": "chunked"})
            for _ in range(BIG // 8192):
                self.wfile.write(b"2000\r\n" + b"\0" * 8192 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/close":  # no Content-Length: the body ends when the connection closes
            self.close_connection = True
            self._send(200, {"Connection": "close"}, b"\0" * BIG)
        elif path == "/biglength":
            self.close_connection = True
            self._send(200, {"Content-Length": str(10**9)})
        elif path == "/drip":
            self._send(200, {"Content-Length": "100"})
            for _ in range(10):  # bounded: at most 5 s even if nobody hangs up
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)
        elif path == "/gzip":  # a gzip bomb, whatever Accept-Encoding asked for (?mib=N: inflated size)
            bomb = gzip_bomb(int(query["mib"][0]) << 20) if "mib" in query else gzip_bomb()
            headers = {"Content-Encoding": "gzip", "Content-Type": "image/png"}
            self._send(200, {**headers, "Content-Length": str(len(bomb))}, bomb)
        elif path == "/endless":  # a body that never ends (bounded: ~5 s, 2.5 MiB, if nobody hangs up)
            self._send(200, {"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
            for _ in range(50):
                self.wfile.write(b"c800\r\n" + b" " * 51200 + b"\r\n")
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/status/"):  # /status/N: an empty answer with that status
            self._send(int(path.rsplit("/", 1)[1]), {"Content-Length": "0"})
        else:
            self._send(404, {"Content-Length": "9"}, b"not found")


@contextlib.contextmanager
def hostile_server() -> Iterator[str]:
    """Serve ``HostileHandler`` on an ephemeral loopback port; yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def https_redirecting_client(real_factory, target: str):
    """A ``serve.outbound.fetch.pinned_client`` stand-in whose https:// URLs answer ``302 -> target``.

    Plain-http URLs still go through the real pinned transport (so every SSRF rule applies); only the
    https hop is simulated, so no TLS certificate is needed to test an https -> http downgrade."""

    def client(policy, param="image", **kwargs):
        inner = real_factory(policy, param, **kwargs)

        async def handle(request: httpx.Request) -> httpx.Response:
            if request.url.scheme == "https":
                return httpx.Response(302, headers={"Location": target, "Content-Length": "0"})
            return await inner._transport.handle_async_request(request)

        return httpx.AsyncClient(transport=httpx.MockTransport(handle), follow_redirects=False)

    return client
