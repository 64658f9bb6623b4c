"""The shipped dtype on the real stack: every family served in float16 over HTTP, checked against float32.

Production (``cluster/serve_config.yaml``, the KubeRay gpu overlay) serves every model with
``dtype: float16``. This module deploys a second application on the session's Ray cluster whose
tiny models (one per family, ``SERVED_DTYPES``) load in that dtype, with its own bucket and route
prefix, and goes through the REST API and the real S3 server:

- ``GET /v1/models`` reports the configured dtype;
- each output downloads from its presigned URL, decodes as an 8-bit RGB PNG that is not constant,
  not mostly clipped (a NaN in half precision decodes to a black or constant image), and is within
  a few 8-bit levels of the *float32 stock diffusers pipeline* (the oracle) run in this process on
  the same weights, yet not equal to it everywhere (the replica really computed in half precision);
- the same request sent again gives byte-identical PNG bytes; another seed gives other pixels.
  (Sent one after the other, so each runs alone. In fast mode a request batched with others is only
  within the tolerance below of the same request alone: half-precision GEMMs are batch-variant;
  measured here, 1 level in ~0.1-3% of values for float16, up to 3 levels for bfloat16.)
- guidance at most 1 (one UNet row per sample, no classifier-free guidance) is served;
- the models run with ``OPTIMIZE``: channels_last weights, UNet calls padded to row buckets, each
  bucket warmed up before the replica takes traffic;
- a concurrent mix of strengths, steps and guidance scales on every model all succeed, each close
  to its own oracle, and the model replicas' batch counters show that UNet calls were shared.

``SERVED_DTYPES`` is read by ``tests/unit/test_shipped_dtypes.py``: keep it equal to what is deployed.
"""

from __future__ import annotations

import base64
import copy
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import _stack_args, side_app, side_client, wait_for
from tests.support.engine_requests import engine_request

#: (family value, dtype) of every model this module serves over HTTP; the unit test of shipped
#: configs requires each family production ships to be served here in one of its shipped dtypes.
SERVED_DTYPES: frozenset[tuple[str, str]] = frozenset(
    {
        ("sd", "float16"),
        ("sdxl", "float16"),
        ("instruct-pix2pix", "float16"),
        ("sd3", "bfloat16"),  # production serves the transformer families in bfloat16
        ("flux", "bfloat16"),
    }
)

APP_NAME, ROUTE_PREFIX, BUCKET = "half-precision", "/half", "integration-half-precision"
OPTIMIZE = {"channels_last": True, "row_buckets": [2, 4, 8], "warmup_sizes": [[64, 64]]}
URL = "/v1/image-to-image"
SIZE = 64

#: Largest and mean |served - float32 stock pipeline| allowed, in 8-bit levels. Measured for float16
#: on the tiny models, mixed strengths/steps/guidance up to 50 steps: max 3, mean <= 0.2
#: (bfloat16: max 14, mean <= 1.2 on the UNet families, max 30, mean 2.3 on tiny FLUX, whose
#: bfloat16-vs-float32 noise floor is ~0.09 of the pixel range in the engine tests too; float32:
#: max 1 in <= 0.02% of values). An image from the wrong seed or a broken model is ~50 levels off
#: on average.
TOLERANCE = {"float16": (8, 0.5), "bfloat16": (40, 3.5), "float32": (2, 0.05)}
#: Fewer differing channel values than this (vs the float32 oracle) means the replica did not really
#: compute in half precision. Measured for float16: 4-12% of values differ by a level or two.
MIN_DIFFERING_FRACTION = 0.005


def _model_id(family: str, dtype: str) -> str:
    return f"tiny-{family}-{dtype}"


@dataclass(frozen=True)
class Served:
    family: str
    dtype: str

    @property
    def model(self) -> str:
        return _model_id(self.family, self.dtype)

    def __str__(self) -> str:  # test ids
        return f"{self.family}-{self.dtype}"


SERVED = sorted((Served(f, d) for f, d in SERVED_DTYPES), key=str)


def _source_png() -> bytes:
    """A structured (not flat) 64x64 source, so img2img has something to keep."""
    rng = np.random.default_rng(1234)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[: SIZE // 2] //= 2  # a darker top half
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SOURCE = _source_png()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _body(
    served: Served, seed: int, strength: float = 0.7, steps: int = 8, guidance_scale: float = 7.5
) -> dict:
    body = {
        "image": _data_url(SOURCE),
        "model": served.model,
        "prompt": "a harbour at night",
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "output_format": "png",
    }
    if served.family != "instruct-pix2pix":  # pix2pix has no strength (it would draw a warning)
        body["strength"] = strength
    return body


@pytest.fixture(scope="module")
def half(stack, tiny_model_dirs):
    """A second application serving one tiny model per family in half precision; deleted after."""

    from inference.models import Family

    args = _stack_args(tiny_model_dirs[Family.SD], BUCKET)
    args.pop("openai")  # its aliases name the main application's model
    template = args["models"][0]
    args["models"] = [
        {
            **copy.deepcopy(template),
            "spec": {
                "id": s.model,
                "family": s.family,
                "source": str(tiny_model_dirs[Family(s.family)]),
                "dtype": s.dtype,
                "smoke": True,
            },
            "num_cpus": 0.25,
            # The production optimisations short of compiling: NHWC weights, UNet calls padded to
            # row buckets, and every bucket warmed in the replica's constructor.
            "optimize": OPTIMIZE,
        }
        for s in SERVED
    ]
    args["tenants"] = []  # the main app's tenant names its own model; keys come from the environment
    args["ingress"] = {"scaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.1}
    with side_app(stack, args, APP_NAME, ROUTE_PREFIX) as base, side_client(stack, base) as http:
        yield http


@pytest.fixture(scope="module")
def oracle(tiny_model_dirs):
    """``oracle(served, body)``: the float32 stock diffusers pipeline's image for ``body``, as uint8."""
    import torch

    from inference.models import Family, ModelSpec
    from inference.pipelines import load_pipeline, run_stock

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model replicas share the cores
    pipes = {
        s.family: load_pipeline(
            ModelSpec(id=f"oracle-{s.family}", family=s.family, source=str(tiny_model_dirs[Family(s.family)]))
        )
        for s in SERVED
    }
    source = Image.open(io.BytesIO(SOURCE)).convert("RGB")

    def expected(served: Served, body: dict, image_index: int = 0) -> np.ndarray:
        request = engine_request(
            request_id="oracle",
            model=served.model,
            prompt=body["prompt"],
            image=source,
            seed=body["seed"],
            strength=body.get("strength", 0.7),
            steps=body["steps"],
            guidance_scale=body["guidance_scale"],
            image_guidance_scale=1.5,  # the model default a REST call gets (REST has no such field)
            num_images=image_index + 1,
        )
        return np.asarray(run_stock(pipes[served.family], served.family, request, image_index), np.int16)

    yield expected
    torch.set_num_threads(threads)


def _generate(http: httpx.Client, body: dict) -> tuple[dict, list[bytes]]:
    """POST the request; 200 with one completed image per requested image, downloaded from S3."""
    response = http.post(URL, json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "completed" and job["model"] == body["model"] and not job["warnings"], job
    assert len(job["images"]) == body.get("num_images", 1), job
    downloads = []
    for info in job["images"]:
        download = httpx.get(info["url"], timeout=30)  # presigned by the real S3 server: no credentials
        assert download.status_code == 200, download.text
        downloads.append(download.content)
    return job, downloads


def _pixels(data: bytes) -> np.ndarray:
    """Decode fully and check the image is a real one: 8-bit RGB, right size, neither flat nor clipped."""
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (SIZE, SIZE))
    pixels = np.asarray(image.convert("RGB"), np.int16)  # decodes every row: a truncated file raises
    assert pixels.shape == (SIZE, SIZE, 3) and np.isfinite(pixels).all()
    clipped = float(np.mean((pixels == 0) | (pixels == 255)))
    summary = f"mean {pixels.mean():.1f}, std {pixels.std():.1f}, clipped {clipped:.1%}"
    assert pixels.std() > 5 and len(np.unique(pixels)) > 32, f"flat image (NaN in half precision?): {summary}"
    assert clipped < 0.5, f"mostly clipped image (overflow in half precision?): {summary}"
    return pixels


def _assert_close_to_oracle(served: Served, got: np.ndarray, want: np.ndarray, what: str) -> None:
    diff = np.abs(got - want)
    max_levels, mean_levels = TOLERANCE[served.dtype]
    report = f"{what}: |served {served.dtype} - float32 stock| max {diff.max()}, mean {diff.mean():.3f}"
    print(report)
    assert diff.max() <= max_levels and diff.mean() <= mean_levels, report
    differing = float(np.mean(diff > 0))
    if served.dtype != "float32":
        assert differing >= MIN_DIFFERING_FRACTION, (
            f"{report}, {differing:.2%} of values differ: equal to float32 almost everywhere; "
            f"was the model really loaded in {served.dtype}?"
        )


def test_model_listing_reports_each_served_dtype(half):
    response = half.get("/v1/models")
    assert response.status_code == 200, response.text
    listed = {m["id"]: (m["family"], m["dtype"]) for m in response.json()["data"]}
    assert listed == {s.model: (s.family, s.dtype) for s in SERVED}


@pytest.mark.parametrize("served", SERVED, ids=str)
def test_same_seed_is_byte_identical_other_seed_differs_and_both_match_float32(half, oracle, served):
    body = _body(served, seed=21)
    _, (first,) = _generate(half, body)
    _, (again,) = _generate(half, body)
    assert again == first, "the same request (seed, parameters, source) gave other image bytes"
    pixels = _pixels(first)
    _assert_close_to_oracle(served, pixels, oracle(served, body), f"{served} seed 21")

    other_body = {**body, "seed": 22}
    _, (other,) = _generate(half, other_body)
    other_pixels = _pixels(other)
    assert np.abs(other_pixels - pixels).mean() > 5, "another seed gave (almost) the same image"
    _assert_close_to_oracle(served, other_pixels, oracle(served, other_body), f"{served} seed 22")


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])  # the REST API refuses 0
@pytest.mark.parametrize("served", SERVED, ids=str)
def test_guidance_at_most_one_runs_without_cfg(half, oracle, served, guidance_scale):
    body = _body(served, seed=5, strength=0.9, steps=6, guidance_scale=guidance_scale)
    _, (image,) = _generate(half, body)
    _assert_close_to_oracle(
        served, _pixels(image), oracle(served, body), f"{served} guidance {guidance_scale}"
    )


def _model_counter(stack, name: str, model: str) -> float:
    """Sum of a counter's series for one model on Ray's metrics exporter (0 before its first increment)."""
    text = httpx.get(f"http://{stack.metrics_url}/metrics", timeout=10).text
    tag = f'model="{model}"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and tag in line
    )


#: (strength, steps, guidance_scale): all different, one of them guidance-free (one UNet row).
MIX = [(0.3, 12, 3.0), (0.6, 8, 7.5), (1.0, 10, 1.0), (0.8, 14, 5.0), (0.5, 9, 9.0)]


def _denoising_steps(served: Served, body: dict) -> int:
    """Steps the pipeline really runs: img2img skips the first (1 - strength) of the schedule."""
    if served.family == "instruct-pix2pix":
        return body["steps"]
    return min(int(body["steps"] * body["strength"]), body["steps"])


def test_concurrent_mixed_requests_share_unet_calls_and_each_matches_float32(half, oracle, stack):
    bodies = [
        (s, _body(s, seed=100 + i, strength=strength, steps=steps, guidance_scale=guidance))
        for s in SERVED
        for i, (strength, steps, guidance) in enumerate(MIX)
    ]
    counters = ("ray_img2img_unet_calls_total", "ray_img2img_batched_samples_total")
    before = {s.model: [_model_counter(stack, c, s.model) for c in counters] for s in SERVED}
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda pair: _generate(half, pair[1]), bodies))
    for (served, body), (_, (image,)) in zip(bodies, results, strict=True):
        params = {k: body.get(k) for k in ("strength", "steps", "guidance_scale")}
        what = f"{served} {params}"
        _assert_close_to_oracle(served, _pixels(image), oracle(served, body), what)

    def exported(served: Served):
        """(UNet calls, samples over those calls) since ``before``, once every step is exported."""
        calls, samples = (
            _model_counter(stack, c, served.model) - b
            for c, b in zip(counters, before[served.model], strict=True)
        )
        steps = sum(_denoising_steps(s, body) for s, body in bodies if s == served)
        return samples >= steps and (calls, samples)

    for served in SERVED:
        calls, samples = wait_for(lambda s=served: exported(s), 30, 0.5, f"{served.model}'s batch metrics")
        print(
            f"{served}: {samples:.0f} sample steps in {calls:.0f} UNet calls ({samples / calls:.2f} per call)"
        )
        assert samples / calls > 1.0, (
            f"{served}: no UNet call was shared ({samples:.0f} samples, {calls:.0f} calls)"
        )
