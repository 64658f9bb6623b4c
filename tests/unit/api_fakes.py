"""Fakes and helpers for the HTTP-layer tests: a model backend, an app builder, source images.

Nothing here touches Ray or the network: the backend paints solid-colour images, URL sources are
served by a monkeypatched ``serve.generation.service.fetch_image``, and the app is driven in-process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image

from inference.models import ModelRegistry
from inference.types import GenerationParams, GenerationRequest, GenerationResult, Preview, Progress
from serve.api.app import create_app
from serve.api.job_views import job_renderer
from serve.generation.calls import GenerationCall
from serve.generation.service import GenerationService
from serve.jobs.records import JobStore, RequestEcho
from serve.jobs.runner import JobRunner
from serve.jobs.webhooks import WebhookPolicy
from serve.outbound.fetch import FetchPolicy
from serve.storage.objects import LocalObjectStore
from serve.tenancy.governor import LocalAdmission, TenantGovernor
from serve.tenancy.tenants import TenantCatalog, TenantDirectory, TenantStore

API_KEY = "test-key-123"
TENANT = "tenant-a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BASE_URL = "http://testserver"  # TestClient's host, so stored-file URLs download through the same client

#: sd first (the default model), then sdxl and instruct-pix2pix. Sources are never loaded.
MODEL_CONFIG: list[dict[str, Any]] = [
    {"id": "sd-test", "family": "sd", "source": "org/sd"},
    {"id": "sdxl-test", "family": "sdxl", "source": "org/sdxl"},
    {"id": "pix2pix-test", "family": "instruct-pix2pix", "source": "org/pix2pix"},
]
MODEL_IDS = [m["id"] for m in MODEL_CONFIG]


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A colour that is a function of the seed, so images of different seeds differ."""
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


@dataclass
class FakeBackend:
    """``ModelBackend`` that returns solid-colour images of the request's size, one per seed."""

    ready: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(MODEL_IDS))
    error: BaseException | None = None
    calls: list[tuple[str, GenerationRequest]] = field(default_factory=list)
    warnings: tuple[str, ...] = ()

    gate: asyncio.Event | None = None  # when set, generation waits for it (to observe running jobs)
    cancelled: list[str] = field(default_factory=list)  # requests canceled while waiting at the gate

    async def generate(self, model_id: str, request: GenerationRequest, on_progress=None) -> GenerationResult:
        self.calls.append((model_id, request))
        if on_progress is not None:
            await on_progress(Progress(1, request.steps))
            await self._previews(request, on_progress)
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.request_id)
                raise
        if self.error is not None:
            raise self.error
        images = tuple(Image.new("RGB", request.image.size, seed_colour(s)) for s in request.seeds)
        return GenerationResult(
            request_id=request.request_id,
            images=images,
            seeds=request.seeds,
            unet_steps=request.steps * request.num_images,
            queue_wait_s=0.0,
            run_s=0.01,
            compute_s=0.25 * request.num_images,  # its share of the batched model time
            warnings=self.warnings,
        )

    async def readiness(self) -> dict[str, str | None]:
        return dict(self.ready)

    @staticmethod
    async def _previews(request: GenerationRequest, on_progress) -> None:
        """What the engine sends a request that asked for previews: one per image every k steps, an
        8x smaller picture (here a solid one whose colour is the step)."""
        every, steps = request.preview_every, request.steps
        for step in range(every, steps, every) if every else ():
            size = (max(1, request.image.width // 8), max(1, request.image.height // 8))
            previews = tuple(
                Preview(i, step, steps, Image.new("RGB", size, (step, 0, 0)))
                for i in range(request.num_images)
            )
            await on_progress(
                Progress(step * request.num_images, steps * request.num_images, previews=previews)
            )

    @property
    def last(self) -> GenerationRequest:
        assert self.calls, "the backend was never called"
        return self.calls[-1][1]

    @property
    def last_model(self) -> str:
        assert self.calls, "the backend was never called"
        return self.calls[-1][0]


def rest_call(image: str, prompt: str = "p", seed: int | None = None, tenant: str = TENANT) -> GenerationCall:
    """A call as the REST route builds one (its spec's strength and steps), for tests of the layers
    below the routes."""
    params = GenerationParams(prompt=prompt, strength=0.7, steps=30, seed=seed)
    return GenerationCall(tenant=tenant, image=image, params=params)


#: The request as written, for records made by tests.
TEST_ECHO = RequestEcho(prompt="p", strength=0.7, steps=30, guidance_scale=7.5)

WEBHOOK_SECRET = b"webhook-secret-for-tests"


def receiver_verifies(secret: str | bytes, raw: bytes, headers: dict, tenant: str | None = None) -> bool:
    """What a receiver does, with the ``standardwebhooks`` package: verify the delivery, then check that
    it names the receiver's tenant. ``secret`` as the receiver configures it (``whsec_...``); bytes are
    a server key, which receivers configure in its Standard Webhooks form."""
    from standardwebhooks import Webhook, WebhookVerificationError

    from serve.jobs.webhooks import standard_secret

    try:
        payload = Webhook(secret if isinstance(secret, str) else standard_secret(secret)).verify(raw, headers)
    except WebhookVerificationError:
        return False
    return tenant is None or (isinstance(payload, dict) and payload.get("tenant") == tenant)


URL_SIGNING_KEY = b"0123456789abcdef0123"


def build_app(tmp_path: Path, backend: FakeBackend | None = None, **app_options: Any) -> FastAPI:
    """The app with fakes in ``app.state``; ``app_options`` go to ``create_app`` (body limit, CORS)."""
    app = create_app(**app_options)
    app.state.service = GenerationService(
        registry=ModelRegistry.from_config(MODEL_CONFIG),
        backend=backend or FakeBackend(),
        store=LocalObjectStore(tmp_path / "store", BASE_URL, URL_SIGNING_KEY),
        fetch_policy=FetchPolicy(max_bytes=10 * 1024 * 1024),
    )
    catalog = TenantCatalog(
        TenantDirectory.from_plain_keys({API_KEY: TENANT}), TenantStore(app.state.service.store)
    )
    app.state.tenants = catalog
    app.state.usage = LocalAdmission(TenantGovernor())
    app.state.service.admission = app.state.usage
    app.state.service.tenant_lookup = catalog.lookup
    app.state.job_store = JobStore(app.state.service.store)
    app.state.jobs = JobRunner(
        app.state.service,
        app.state.job_store,
        job_renderer(app.state.service.store, app.state.service.url_expiry_s),
        webhook_secret=WEBHOOK_SECRET,
        webhook_policy=WebhookPolicy(max_attempts=3, first_delay_s=0.05, timeout_s=2),
        fetch_policy=FetchPolicy(allow_networks=("127.0.0.1/32",)),
    )
    return app


class WebhookReceiver:
    """A loopback webhook target that answers 500 to the first ``failures`` deliveries.

    ``received`` holds ``(headers, raw body)`` of every delivery; call ``close()`` when done."""

    def __init__(self, failures: int = 0) -> None:
        self.failures, self.received = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), raw))
                status = 500 if len(outer.received) <= outer.failures else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", colour=(120, 60, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(width: int = 64, height: int = 48, fmt: str = "PNG") -> str:
    mime = "image/jpeg" if fmt.upper() == "JPEG" else f"image/{fmt.lower()}"
    payload = base64.b64encode(image_bytes(width, height, fmt)).decode()
    return f"data:{mime};base64,{payload}"


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class FakeFetch:
    """Stands in for ``serve.generation.service.fetch_image``: records URLs, returns fixed bytes or raises."""

    def __init__(self, data: bytes | None = None, error: BaseException | None = None) -> None:
        self.data = data if data is not None else image_bytes(96, 64, "JPEG")
        self.error = error
        self.urls: list[str] = []

    async def __call__(self, url: str, policy: FetchPolicy, *, param: str = "image") -> bytes:
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        return self.data


def assert_error(response, status: int, code: str, *, param: str | None = None, mentions=()) -> dict:
    """The response is ``{"error": {"code", "message", "details", ...}}`` with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert {"code", "message", "details"} <= set(error), error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error.get("param") == param, error
    text = f"{error['message']} {error['details'] or ''}"
    for word in mentions:
        assert word in text, (word, error)
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


def download(client, url: str) -> bytes:
    """GET a stored-file URL through the in-process client (the store's base URL is the client's)."""
    assert url.startswith(f"{BASE_URL}/files/"), url
    response = client.get(url)
    assert response.status_code == 200, response.text
    return response.content


def route_helpers(url: str):
    """``post(client, payload, headers=AUTH)`` and ``ok(client, payload) -> json`` for one JSON route."""

    def post(client, payload, headers=AUTH):
        return client.post(url, json=payload, headers=headers)

    def ok(client, payload) -> dict:
        response = post(client, payload)
        assert response.status_code == 200, response.text
        return response.json()

    return post, ok
