"""Locust scenarios for the img2img HTTP APIs: black box, HTTP only, imports nothing from the project.

Run it through the runner (``python -m loadtests``), or directly::

    LOADTEST_API_KEYS=KEY locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \
        RestSyncUser NodeUser

Configuration (environment, all optional except the key):

* ``LOADTEST_API_KEYS`` — comma-separated ``[name=]key[:weight]``; a user picks its tenant by weight once
  when it starts. Unnamed keys are ``tenant1``, ``tenant2``, ... Every request name carries the tenant,
  e.g. ``rest_sync [tenant1]``, so per-tenant statistics come out.
* ``LOADTEST_STEPS`` — ``MIN-MAX`` denoising steps per request (default ``2-4``), ``LOADTEST_IMAGE_SIZE``
  (default 64), ``LOADTEST_MODEL`` (default: the service's default model).
* ``LOADTEST_SHAPE`` — ``constant`` | ``step`` | ``spike`` (default ``constant``), ``LOADTEST_USERS``
  (peak users, default 4), ``LOADTEST_DURATION`` (seconds, default 60, at most 900).
* ``LOADTEST_ASYNC_TIMEOUT`` — seconds an async job may take before it counts as failed (default 300),
  ``LOADTEST_POLL_INTERVAL`` (default 0.5 s).
* ``LOADTEST_PROGRESS_INTERVAL`` — seconds between ``LOADTEST_PROGRESS {json}`` lines on stdout (default 5).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import sys
import time

import gevent
from locust import HttpUser, LoadTestShape, between, events, task
from locust import stats as locust_stats
from PIL import Image

try:
    from loadtests._shared import MAX_DURATION_S, PROMPTS, SHAPES, parse_api_keys, parse_steps
except ImportError:  # `locust -f loadtests/locustfile.py` from a folder where `loadtests` is not importable
    from _shared import MAX_DURATION_S, PROMPTS, SHAPES, parse_api_keys, parse_steps

FINAL_STATES = {"completed", "failed", "canceled"}

# The runner reads the history CSV while the test runs: flush it often.
locust_stats.CSV_STATS_FLUSH_INTERVAL_SEC = 2


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


TENANTS = parse_api_keys(os.environ.get("LOADTEST_API_KEYS", "")) or [("anonymous", "", 1.0)]
STEPS = parse_steps(os.environ.get("LOADTEST_STEPS", "2-4"))
IMAGE_SIZE = int(_env_float("LOADTEST_IMAGE_SIZE", 64))
MODEL = os.environ.get("LOADTEST_MODEL") or None
ASYNC_TIMEOUT_S = min(_env_float("LOADTEST_ASYNC_TIMEOUT", 300), MAX_DURATION_S)
POLL_INTERVAL_S = max(_env_float("LOADTEST_POLL_INTERVAL", 0.5), 0.05)


def make_png(rng: random.Random, size: int = IMAGE_SIZE) -> bytes:
    """A small source image with a random colour gradient, made in memory."""
    image = Image.new("RGB", (size, size))
    r0, g0, b0 = (rng.randrange(256) for _ in range(3))
    image.putdata(
        [
            ((r0 + x * 3) % 256, (g0 + y * 3) % 256, (b0 + x + y) % 256)
            for y in range(size)
            for x in range(size)
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_ASSIGNED: dict[str, int] = {}


def pick_tenant() -> tuple[str, str]:
    """Weighted round robin over the tenants (smooth: the one furthest below its share goes next), so
    every tenant with a weight gets users as soon as there are as many users as tenants."""
    weighted = [t for t in TENANTS if t[2] > 0] or TENANTS
    name, key, _ = min(weighted, key=lambda t: ((_ASSIGNED.get(t[0], 0) + 1) / (t[2] or 1.0), -t[2]))
    _ASSIGNED[name] = _ASSIGNED.get(name, 0) + 1
    return name, key


class Img2ImgUser(HttpUser):
    """Common parts: a tenant picked by weight, random parameters, a pool of source images."""

    abstract = True
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.tenant, key = pick_tenant()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.images = [make_png(self.rng) for _ in range(3)]

    def label(self, endpoint: str) -> str:
        return f"{endpoint} [{self.tenant}]"

    def params(self) -> dict:
        return {
            "prompt": self.rng.choice(PROMPTS),
            "strength": round(self.rng.uniform(0.3, 1.0), 2),
            "steps": self.rng.randint(*STEPS),
            "guidance_scale": round(self.rng.uniform(1.5, 9.0), 1),
            "seed": self.rng.randrange(2**31),
        }

    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.rng.choice(self.images)).decode()

    def rest_body(self) -> dict:
        body = {"image": self.data_url(), "num_images": 1, **self.params()}
        if MODEL:
            body["model"] = MODEL
        return body

    def post_for_images(self, path: str, endpoint: str, key: str, **body) -> None:
        """POST, then fail the sample unless it answered 200 with a non-empty list under ``key``."""
        with self.client.post(
            path, headers=self.headers, name=self.label(endpoint), catch_response=True, **body
        ) as response:
            payload = self.check(response, 200, want=key)
            if payload is not None and not payload[key]:
                response.failure("no images")

    def check(self, response, expected: int, *, want: str) -> dict | None:
        """Mark the response failed unless it has the expected status and a JSON body with ``want``."""
        if response.status_code != expected:
            response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            return None
        try:
            payload = response.json()
        except ValueError:
            response.failure("response is not JSON")
            return None
        if want not in payload:
            response.failure(f"response has no {want!r}")
            return None
        response.success()
        return payload


class RestSyncUser(Img2ImgUser):
    """``POST /v1/image-to-image``, answered when the images are ready."""

    @task
    def rest_sync(self) -> None:
        with self.client.post(
            "/v1/image-to-image",
            json=self.rest_body(),
            headers=self.headers,
            name=self.label("rest_sync"),
            catch_response=True,
        ) as response:
            payload = self.check(response, 200, want="status")
            if payload is not None and payload["status"] != "completed":
                response.failure(f"job status {payload['status']}: {payload.get('error')}")


class NodeUser(Img2ImgUser):
    """``POST /v1/nodes/image_to_image``, the node API."""

    @task
    def node(self) -> None:
        params = self.params()
        body = {
            "source_image": self.data_url(),
            "prompt": params["prompt"],
            "negative_prompt": "blurry",
            "strength": params["strength"],
            "steps": params["steps"],
            "guidance_scale": max(params["guidance_scale"], 0.1),
            "seed": params["seed"],
            "batch_size": 1,
        }
        if MODEL:
            body["model"] = MODEL
        self.post_for_images("/v1/nodes/image_to_image", "node", "images", json=body)


class AsyncUser(Img2ImgUser):
    """``Prefer: respond-async`` submit, then GET polls until the job is final (bounded).

    Besides ``async_submit`` and ``async_poll`` it reports ``async_e2e``: submit to final state.
    """

    @task
    def async_job(self) -> None:
        started = time.perf_counter()
        with self.client.post(
            "/v1/image-to-image",
            json=self.rest_body(),
            headers={**self.headers, "Prefer": "respond-async"},
            name=self.label("async_submit"),
            catch_response=True,
        ) as response:
            job = self.check(response, 202, want="id")
        if job is None:
            return
        status, error = job.get("status"), None
        deadline = started + ASYNC_TIMEOUT_S
        for _ in range(int(ASYNC_TIMEOUT_S / POLL_INTERVAL_S) + 1):
            if status in FINAL_STATES or time.perf_counter() > deadline:
                break
            gevent.sleep(POLL_INTERVAL_S)
            with self.client.get(
                f"/v1/image-to-image/{job['id']}",
                headers=self.headers,
                name=self.label("async_poll"),
                catch_response=True,
            ) as response:
                polled = self.check(response, 200, want="status")
            if polled is not None:
                status = polled["status"]
                error = polled.get("error")
        if status != "completed":
            error = f"job {job['id']} ended {status}: {error}" if status in FINAL_STATES else "poll timeout"
        events.request.fire(
            request_type="ASYNC",
            name=self.label("async_e2e"),
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=RuntimeError(error) if error or status != "completed" else None,
            context={},
        )


class OpenAIEditsUser(Img2ImgUser):
    """``POST /v1/images/edits``, multipart like OpenAI's client sends it."""

    @task
    def openai_edits(self) -> None:
        params = self.params()
        form = {
            "prompt": params["prompt"],
            "n": "1",
            "response_format": "url",
            "strength": str(params["strength"]),
            "steps": str(params["steps"]),
            "guidance_scale": str(params["guidance_scale"]),
            "seed": str(params["seed"]),
        }
        if MODEL:
            form["model"] = MODEL
        files = {"image": ("source.png", self.rng.choice(self.images), "image/png")}
        self.post_for_images("/v1/images/edits", "openai_edits", "data", data=form, files=files)


class SelectedShape(LoadTestShape):
    """The shape named by ``LOADTEST_SHAPE`` with ``LOADTEST_USERS`` and ``LOADTEST_DURATION``."""

    def __init__(self) -> None:
        super().__init__()
        self.shape = SHAPES[os.environ.get("LOADTEST_SHAPE", "constant")]
        self.users = max(1, int(_env_float("LOADTEST_USERS", 4)))
        self.duration = min(max(_env_float("LOADTEST_DURATION", 60), 1), MAX_DURATION_S)

    def tick(self) -> tuple[int, float] | None:
        return self.shape(self.get_run_time(), self.users, self.duration)


# ---------------------------------------------------------------------------------------------------------
# Progress: one JSON line every few seconds, read by the runner.


@events.test_start.add_listener
def _start_progress(environment, **_kwargs) -> None:
    interval = max(_env_float("LOADTEST_PROGRESS_INTERVAL", 5), 1)
    started = time.time()

    def report() -> None:
        for _ in range(int(MAX_DURATION_S * 2 / interval) + 1):
            gevent.sleep(interval)
            runner = environment.runner
            if runner is None or runner.state in ("stopped", "quitting"):
                return
            total = environment.stats.total
            line = {
                "elapsed_s": round(time.time() - started, 1),
                "users": runner.user_count,
                "requests": total.num_requests,
                "failures": total.num_failures,
                "rps": round(total.current_rps, 2),
                "p50_ms": total.get_current_response_time_percentile(0.5),
            }
            print("LOADTEST_PROGRESS " + json.dumps(line), file=sys.stdout, flush=True)

    gevent.spawn(report)
