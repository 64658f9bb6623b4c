"""One soak request end to end: draw mixed parameters, send it to one of the four APIs, check the answer.

Every response is checked (status, body shape, image count) and a sample of the image URLs is
downloaded and decoded, so a soak passes only when the service really kept producing images. Anything
else becomes an error code (``classify_*``) that the report counts: ``http_<status>:<code>`` for the
service's error envelopes (REST, node and OpenAI shapes alike), ``transport:<Exception>`` when no
answer came, and ``bad_body:...``, ``job_...`` or ``download:...`` when an answer was wrong.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from dataclasses import dataclass

import httpx

from loadtests._shared import PROMPTS

ENDPOINTS = ("rest_sync", "async", "node", "openai")
SIDES = (64, 96, 128)  # source and output sides: several latent sizes, all multiples of 8
STEPS = (4, 12)
FINAL_STATES = {"completed", "failed", "canceled"}


@dataclass(frozen=True)
class Draw:
    """One request's parameters; ``width``/``height`` is the output size the answer must have."""

    endpoint: str
    prompt: str
    strength: float
    steps: int
    guidance_scale: float
    num_images: int
    source_side: int
    width: int
    height: int
    seed: int


def draw(rng: random.Random, endpoints: tuple[str, ...] = ENDPOINTS) -> Draw:
    """Mixed parameters, so requests of every step count, strength and guidance share UNet calls. REST
    outputs keep the source size (the spec has no size); node and OpenAI ask for one of their own."""
    endpoint = rng.choice(endpoints)
    source = rng.choice(SIDES)
    resized = endpoint in ("node", "openai")
    return Draw(
        endpoint=endpoint,
        prompt=f"{rng.choice(PROMPTS)} #{rng.randrange(10**6)}",
        strength=round(rng.uniform(0.3, 1.0), 2),
        steps=rng.randint(*STEPS),
        guidance_scale=round(rng.uniform(1.5, 9.0), 1),
        num_images=rng.randint(1, 2),
        source_side=source,
        width=rng.choice(SIDES) if resized else source,
        height=rng.choice(SIDES) if resized else source,
        seed=rng.randrange(2**31),
    )


def source_images(side: int, count: int = 3, seed: int = 0) -> list[str]:
    """``count`` random-noise PNG data URLs of ``side``×``side`` (noise: PNG cannot shrink it to nothing)."""
    from PIL import Image

    rng = random.Random(seed)
    urls = []
    for _ in range(count):
        image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


class RequestFailed(Exception):
    """A wrong answer; ``args[0]`` is its error code."""


def classify_response(status: int, payload: object) -> str:
    """``http_<status>:<code>`` from the REST/node envelope ``{"error": {"code"}}`` or OpenAI's
    ``{"error": {"code", "type"}}`` (``code`` may be null there); ``http_<status>`` without a code."""
    error = payload.get("error") if isinstance(payload, dict) else None
    code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    return f"http_{status}:{code}" if code else f"http_{status}"


def classify_exception(error: BaseException) -> str:
    """No answer at all: the exception's class, e.g. ``transport:ReadTimeout``."""
    return f"transport:{type(error).__name__}"


def check_image(content: bytes, width: int, height: int) -> str | None:
    """``None`` when ``content`` decodes to an image of ``width``×``height``, else an error code."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return "download:not_an_image"
    return None if size == (width, height) else "download:wrong_size"


def _json(response: httpx.Response, expected: int) -> dict:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code != expected:
        raise RequestFailed(classify_response(response.status_code, payload))
    if not isinstance(payload, dict):
        raise RequestFailed("bad_body:not_a_json_object")
    return payload


def _urls(items: object, count: int, pick) -> list[str]:
    """``count`` URLs picked out of a list of images (strings or objects), else ``bad_body``."""
    if not isinstance(items, list) or len(items) != count:
        raise RequestFailed("bad_body:wrong_image_count")
    urls = [pick(item) for item in items]
    if not all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in urls):
        raise RequestFailed("bad_body:image_without_url")
    return urls


def _job_urls(job: dict, d: Draw) -> list[str]:
    if job.get("status") != "completed":
        code = (job.get("error") or {}).get("code") if isinstance(job.get("error"), dict) else None
        raise RequestFailed(f"job_{job.get('status')}:{code}" if code else f"job_{job.get('status')}")
    return _urls(job.get("images"), d.num_images, lambda item: isinstance(item, dict) and item.get("url"))


class SoakClient:
    """Sends drawn requests with an authenticated client; downloads images with a plain one (an S3
    presigned URL refuses a request that carries someone else's ``Authorization`` header)."""

    def __init__(
        self,
        api: httpx.AsyncClient,
        downloads: httpx.AsyncClient,
        sources: dict[int, list[str]],
        *,
        model: str | None = None,
        poll_interval_s: float = 0.5,
        job_timeout_s: float = 300.0,
        download_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.api = api
        self.downloads = downloads
        self.sources = sources  # side → PNG data URLs
        self.model = model
        self.poll_interval_s = poll_interval_s
        self.job_timeout_s = job_timeout_s
        self.download_fraction = download_fraction
        self.rng = random.Random(f"downloads-{seed}")

    async def run(self, d: Draw) -> tuple[str | None, bool]:
        """Send ``d`` and check everything: ``(error code or None, whether an image was downloaded)``."""
        try:
            urls = await getattr(self, f"_{d.endpoint}")(d, self.rng.choice(self.sources[d.source_side]))
            if self.rng.random() >= self.download_fraction:
                return None, False
            response = await self.downloads.get(urls[0])
            if response.status_code != 200:
                return f"download:http_{response.status_code}", True
            return check_image(response.content, d.width, d.height), True
        except RequestFailed as failure:
            return str(failure.args[0]), False
        except httpx.HTTPError as error:
            return classify_exception(error), False

    def _rest_body(self, d: Draw, source: str) -> dict:
        body = {
            "image": source,
            "prompt": d.prompt,
            "strength": d.strength,
            "steps": d.steps,
            "guidance_scale": d.guidance_scale,
            "num_images": d.num_images,
            "seed": d.seed,
        }
        return {**body, "model": self.model} if self.model else body

    async def _rest_sync(self, d: Draw, source: str) -> list[str]:
        response = await self.api.post("/v1/image-to-image", json=self._rest_body(d, source))
        return _job_urls(_json(response, 200), d)

    async def _async(self, d: Draw, source: str) -> list[str]:
        """Submit with ``Prefer: respond-async`` (202 + Location), then poll until final (bounded)."""
        started = time.monotonic()
        response = await self.api.post(
            "/v1/image-to-image", json=self._rest_body(d, source), headers={"Prefer": "respond-async"}
        )
        job = _json(response, 202)
        location = response.headers.get("location")
        if not location or not job.get("id"):
            raise RequestFailed("bad_body:async_without_location")
        for _ in range(int(self.job_timeout_s / self.poll_interval_s) + 1):
            if job.get("status") in FINAL_STATES or time.monotonic() - started > self.job_timeout_s:
                break
            await asyncio.sleep(self.poll_interval_s)
            job = _json(await self.api.get(location), 200)
        if job.get("status") not in FINAL_STATES:
            raise RequestFailed("job_timeout")
        return _job_urls(job, d)

    async def _node(self, d: Draw, source: str) -> list[str]:
        body = {
            "source_image": source,
            "prompt": d.prompt,
            "negative_prompt": "blurry",
            "strength": d.strength,
            "steps": d.steps,
            "guidance_scale": d.guidance_scale,
            "batch_size": d.num_images,
            "seed": d.seed,
            "width": d.width,
            "height": d.height,
        }
        if self.model:
            body["model"] = self.model
        payload = _json(await self.api.post("/v1/nodes/image_to_image", json=body), 200)
        return _urls(payload.get("images"), d.num_images, lambda url: url)

    async def _openai(self, d: Draw, source: str) -> list[str]:
        form = {
            "prompt": d.prompt,
            "n": str(d.num_images),
            "size": f"{d.width}x{d.height}",
            "response_format": "url",
            "strength": str(d.strength),
            "steps": str(d.steps),
            "guidance_scale": str(d.guidance_scale),
            "seed": str(d.seed),
        }
        if self.model:
            form["model"] = self.model
        png = base64.b64decode(source.partition(",")[2])
        response = await self.api.post(
            "/v1/images/edits", data=form, files={"image": ("source.png", png, "image/png")}
        )
        payload = _json(response, 200)
        return _urls(
            payload.get("data"), d.num_images, lambda item: isinstance(item, dict) and item.get("url")
        )
