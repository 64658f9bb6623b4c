"""The whole stack over real HTTP: Ray Serve, the tiny model, SeaweedFS S3 and Prometheus."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import wait_for as _wait_for


def _png(size=(64, 64), colour=(200, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def image_server():
    """A loopback HTTP server with one PNG: the source for URL-based requests (allow-listed)."""
    body = _png((80, 48))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/source.png"
    server.shutdown()


def _download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)  # presigned: no credentials
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_rest_endpoint_returns_urls_of_real_images(client, stack):
    response = client.post(
        "/v1/image-to-image",
        json={"image": _data_url(_png()), "prompt": "a red boat", "num_images": 2, "steps": 10, "seed": 7},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed" and body["seed"] == 7 and body["model"] == "tiny-sd"
    assert len(body["images"]) == 2
    for image_info in body["images"]:
        assert stack.s3.endpoint in image_info["url"] and "X-Amz-Signature" in image_info["url"]
        image = _download(image_info["url"])
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert _download(body["original_image"]["url"]).size == (64, 64)


def test_node_endpoint_downloads_a_url_source_and_resizes(client, image_server):
    response = client.post(
        "/v1/nodes/image_to_image",
        json={
            "source_image": image_server,
            "prompt": "a castle",
            "negative_prompt": "",
            "batch_size": 3,
            "steps": 8,
            "width": 96,
            "height": 64,
        },
    )
    assert response.status_code == 200, response.text
    urls = response.json()["images"]
    assert len(urls) == 3
    images = [_download(url) for url in urls]
    assert {image.size for image in images} == {(96, 64)}
    assert len({image.tobytes() for image in images}) == 3  # seeds s, s+1, s+2 differ


def test_a_bad_request_among_good_ones_fails_alone(client):
    source = _data_url(_png())
    bodies = [
        {"image": source, "prompt": f"good {i}", "steps": 6 + i, "strength": 0.5 + i / 10} for i in range(4)
    ]
    bodies.insert(
        2, {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode(), "prompt": "bad"}
    )
    bodies.insert(4, {"image": source, "prompt": "bad strength", "strength": 3})
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/image-to-image", json=b), bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 400, 200, 400, 200], [r.text for r in responses]
    assert responses[2].json()["error"]["code"] == "invalid_image"
    assert responses[4].json()["error"]["param"] == "strength"


def _metric_sum(stack, name: str) -> float:
    text = httpx.get(f"http://{stack.metrics_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_sixteen_concurrent_mixed_requests_share_denoising_steps(client, stack):
    source = _data_url(_png())
    bodies = [
        {
            "image": source,
            "prompt": f"prompt {i}",
            "strength": (0.3, 0.5, 0.75, 1.0)[i % 4],
            "steps": (10, 20, 30)[i % 3],
            "guidance_scale": (3, 5, 7.5, 9)[i % 4],
            "seed": i,
        }
        for i in range(16)
    ]
    # Counters, not the histogram: Ray rebuilds a histogram's _sum from bucket midpoints.
    steps_before = _metric_sum(stack, "ray_img2img_unet_calls_total")
    samples_before = _metric_sum(stack, "ray_img2img_batched_samples_total")
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/image-to-image", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * 16

    def batched():
        steps = _metric_sum(stack, "ray_img2img_unet_calls_total") - steps_before
        samples = _metric_sum(stack, "ray_img2img_batched_samples_total") - samples_before
        return steps > 0 and samples >= 16 and (samples, steps)

    samples, steps = _wait_for(batched, 30, 1, "batch metrics exported")
    assert samples / steps > 1.0, f"mean samples per UNet step {samples / steps:.2f}: no step was shared"


def test_prometheus_computes_latency_quantiles_from_our_histogram(client, prometheus):
    _wait_for(lambda: prometheus.query("up == 1"), 30, 0.5, "Prometheus scraping Ray's exporter")
    query = "histogram_quantile(0.95, sum by (le) (rate(ray_img2img_request_latency_seconds_bucket[2m])))"

    def has_value():
        # rate() needs the counters to move between two scrapes, so keep traffic flowing while polling.
        client.post("/v1/image-to-image", json={"image": _data_url(_png()), "prompt": "probe", "steps": 4})
        result = prometheus.query(query)
        return result and result[0]["value"][1] not in ("NaN", "0") and result

    result = _wait_for(has_value, 90, 1, "Prometheus latency quantile")
    assert 0 < float(result[0]["value"][1]) < 300


def test_readiness_and_model_listing(client):
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "problems": {}}
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny-sd"] and models[0]["smoke_test_model"] is True


def test_a_model_waiting_for_a_gpu_is_reported_not_ready_instead_of_hanging(stack, tiny_model_dirs):
    """A replica asking for a GPU never starts on this CPU cluster: /readyz must say so at once."""
    from ray import serve

    from inference.models import Family
    from serve.app import build_app
    from tests.integration.conftest import _stack_args

    args = _stack_args(tiny_model_dirs[Family.SD], stack.bucket)
    args["models"][0]["num_gpus"] = 1
    # serve.run waits for RUNNING, which a GPU-less cluster never allows: deploy without waiting.
    from ray.serve.api import _run

    _run(build_app(args), name="needs-gpu", route_prefix="/needs-gpu", _blocking=False)
    try:
        url = f"{stack.base_url}/needs-gpu/readyz"

        def answered():
            try:
                response = httpx.get(url, timeout=10)
            except httpx.HTTPError:
                return None
            return response.status_code in (200, 503) and response

        response = _wait_for(answered, 90, 1, "the GPU app's ingress answering")
        assert response.status_code == 503
        problem = response.json()["problems"]["model:tiny-sd"]
        assert "GPU" in problem
    finally:
        serve.delete("needs-gpu", _blocking=False)


def test_a_request_sent_again_while_its_first_run_is_in_flight_supersedes_it(stack):
    """A job taken over from a killed coordinator reaches the model replica again with the same id while
    the dead caller's run may still be in flight: the newest call runs and gets the images, the older
    run is canceled (not refused: that failed the job, the coordinator-kill test under CI load)."""
    from ray import serve

    from inference.types import GenerationResult, Progress
    from tests.support.engine_requests import engine_request

    replica = serve.get_deployment_handle("model-tiny-sd", app_name="img2img")
    source = Image.new("RGB", (256, 256), (30, 90, 150))
    request = engine_request("img_sent_twice", "tiny-sd", "a harbour", source, steps=50, strength=1.0, seed=3)
    first = iter(replica.options(stream=True).generate_stream.remote(request))
    assert isinstance(next(first), Progress)  # the first run is in the engine
    second = replica.generate.remote(request).result(timeout_s=120)
    assert isinstance(second, GenerationResult) and second.request_id == "img_sent_twice"
    assert len(second.images) == 1 and second.images[0].size == (256, 256)
    with pytest.raises(Exception) as ended:
        for _ in first:  # progress until the cancellation reaches it
            pass
    assert "cancel" in str(ended.value).lower(), ended.value
