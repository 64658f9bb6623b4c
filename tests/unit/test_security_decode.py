"""Security review, finding 1: decode cost. A 71 KB progressive JPEG repeating its last scan 3,000
times cost seconds to a minute of ingress CPU and was then accepted; the image was decoded before the
request was admitted, and decoded again by the job coordinator.

Now: scans (and the samples they code), JPEG marker segments and PNG chunks are counted while the
structure is walked, before Pillow sees the file; the request is admitted between those cheap checks
and the decode; and the coordinator runs an asynchronous job on the image the ingress decoded.
"""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

from inference import images
from inference.errors import InvalidImageError
from inference.images import (
    MAX_IMAGE_HEIGHT,
    MAX_IMAGE_WIDTH,
    MAX_JPEG_SCANS,
    ImageLimits,
    inspect_source_image,
    load_source_image,
)
from serve.generation import service as generation
from serve.storage.objects import object_key
from serve.tenancy.keys import hash_key
from serve.tenancy.tenants import Tenant, TenantStore
from tests.support.image_samples import (
    encode,
    jpeg_scan_bomb,
    jpeg_segments,
    noise,
    png_chunk_flood,
    repeat_last_scan,
)
from tests.unit.api_fakes import AUTH, TENANT, assert_error, data_url, rest_call

SCAN_BOMB = jpeg_scan_bomb()
IMAGE_CODE = {"rest": "invalid_image", "node": "source_image_error", "openai": "invalid_image"}
IMAGE_PARAM = {"rest": "image", "node": "source_image", "openai": "image"}


def _data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def send(client, api: str, data: bytes, headers=AUTH):
    if api == "rest":
        return client.post(
            "/v1/image-to-image", json={"image": _data_url(data), "prompt": "p"}, headers=headers
        )
    if api == "node":
        body = {"source_image": _data_url(data), "prompt": "p", "negative_prompt": ""}
        return client.post("/v1/nodes/image_to_image", json=body, headers=headers)
    files = {"image": ("upload.jpg", data, "image/jpeg")}
    return client.post("/v1/images/edits", data={"prompt": "p"}, files=files, headers=headers)


def _scans(jpeg: bytes) -> int:
    return sum(1 for marker, _, _ in jpeg_segments(jpeg) if marker == 0xDA)


@pytest.fixture
def no_pillow(monkeypatch):
    """Fails the test if Pillow is asked to open anything: the refusal must come from our walk."""

    def refuse(*args, **kwargs):
        raise AssertionError("Pillow opened the file")

    monkeypatch.setattr(images.Image, "open", refuse)


# ------------------------------------------------------------------ the walk


def test_finding1_the_sample_is_the_review_s_scan_bomb():
    """71 KB, 2048x2048, 3,010 scans; structurally valid (with the scan rules lifted, it passes)."""
    assert 70_000 <= len(SCAN_BOMB) <= 75_000
    assert _scans(SCAN_BOMB) == 3010
    lifted = ImageLimits(max_jpeg_scans=10_000, max_jpeg_scan_samples=2**62)
    header = inspect_source_image(SCAN_BOMB, lifted)
    assert (header.format, header.width, header.height) == ("jpeg", 2048, 2048)


def test_finding1_jpeg_scan_bomb_is_refused_from_its_markers_in_milliseconds(no_pillow):
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="scan") as refused:
        inspect_source_image(SCAN_BOMB)
    assert time.perf_counter() - started < 0.5  # measured: ~0.3 ms
    assert refused.value.param == "image"


def test_finding1_scan_count_limit_holds_for_small_images_too(no_pillow):
    """A small image's scans are cheap, but thousands of them still are not a real encoder's output."""
    small = encode(noise(64, 64), "JPEG", progressive=True)
    at_limit = repeat_last_scan(small, MAX_JPEG_SCANS - _scans(small))
    over = repeat_last_scan(small, MAX_JPEG_SCANS - _scans(small) + 1)
    assert _scans(at_limit) == MAX_JPEG_SCANS
    with pytest.raises(InvalidImageError, match=f"at most {MAX_JPEG_SCANS}"):
        inspect_source_image(over)


@pytest.mark.parametrize(
    ("mode", "params"),
    [("RGB", {}), ("RGB", {"subsampling": 0}), ("L", {}), ("CMYK", {})],
    ids=["rgb-420", "rgb-444", "grayscale", "cmyk"],
)
def test_finding1_standard_progressive_jpegs_at_the_size_limit_pass_the_walk(mode, params):
    """libjpeg's own progressive scripts at 2048x2048 stay well inside the scan and sample budgets."""
    picture = noise(256, 256).resize((MAX_IMAGE_WIDTH, MAX_IMAGE_HEIGHT), Image.Resampling.BICUBIC)
    picture = picture.convert(mode)
    data = encode(picture, "JPEG", progressive=True, quality=90, **params)
    header = inspect_source_image(data)
    assert (header.width, header.height) == (MAX_IMAGE_WIDTH, MAX_IMAGE_HEIGHT)


def test_finding1_a_scan_limited_jpeg_still_decodes():
    small = encode(noise(64, 64), "JPEG", progressive=True)
    at_limit = repeat_last_scan(small, MAX_JPEG_SCANS - _scans(small))
    source = load_source_image(at_limit)
    assert source.size == (64, 64) and source.image.mode == "RGB"


def test_finding1_png_chunk_flood_is_refused_before_pillow_reads_it(no_pillow):
    """Pillow reads every chunk in Python: 800,000 empty chunks in 10 MB cost ~2 s. Counted first."""
    with pytest.raises(InvalidImageError, match="PNG chunks"):
        inspect_source_image(png_chunk_flood(10_001))


def test_finding1_many_png_chunks_below_the_limit_are_fine():
    source = load_source_image(png_chunk_flood(9_000))
    assert source.size == (8, 8)


def test_finding1_truncated_structures_are_still_refused():
    jpeg = encode(noise(64, 64), "JPEG", progressive=True)
    for cut in (len(jpeg) - 2, len(jpeg) // 2, 200):
        with pytest.raises(InvalidImageError, match="truncated"):
            inspect_source_image(jpeg[:cut])
    png = encode(noise(64, 64), "PNG")
    with pytest.raises(InvalidImageError, match="truncated"):
        inspect_source_image(png[:-6])


# ------------------------------------------------------------------ over HTTP, every API


@pytest.mark.parametrize("api", ["rest", "node", "openai"])
def test_finding1_scan_bomb_over_http_is_a_quick_4xx_on_every_api(client, backend, api):
    started = time.perf_counter()
    response = send(client, api, SCAN_BOMB)
    elapsed = time.perf_counter() - started
    if api == "openai":
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "invalid_image",
            "image",
            "invalid_request_error",
        )
        assert "scan" in error["message"]
    else:
        assert_error(response, 400, IMAGE_CODE[api], param=IMAGE_PARAM[api], mentions=("scan",))
    assert elapsed < 3.0, elapsed  # before: the 2048x2048 decode, ~8 s of CPU here (~59 s in the review)
    assert backend.calls == []
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------ admission before the decode


KEY = "sk-decode-test-key-0001"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def tenant(app, client):
    """Tenant 'decoder' (key KEY); returns a function that sets its plan."""
    store = TenantStore(app.state.service.store)

    def save(**plan) -> Tenant:
        record = Tenant(name="decoder", key_hashes=[hash_key(KEY)], **plan)
        client.portal.call(store.save, record)
        client.portal.call(app.state.tenants.refresh)
        return record

    return save


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Records every pixel decode the serving layer asks for ('ingress' or 'stored')."""
    calls: list[str] = []
    decode, load = generation.decode_source_image, generation.load_source_image

    def counted_decode(*args, **kwargs):
        calls.append("ingress")
        return decode(*args, **kwargs)

    def counted_load(*args, **kwargs):
        calls.append("stored")
        return load(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_source_image", counted_decode)
    monkeypatch.setattr(generation, "load_source_image", counted_load)
    return calls


def test_finding1_a_request_over_its_rate_limit_is_refused_before_its_image_is_decoded(
    client, tenant, decodes
):
    tenant(rate_limit_images_per_minute=1)
    body = {"image": data_url(64, 48, "JPEG"), "prompt": "a tram"}
    assert client.post("/v1/image-to-image", json=body, headers=HEADERS).status_code == 200
    assert len(decodes) == 1
    assert_error(client.post("/v1/image-to-image", json=body, headers=HEADERS), 429, "rate_limited")
    assert len(decodes) == 1  # before the fix: 2 (decoded, then refused)


def test_finding1_a_decode_failure_after_admission_frees_the_tenant_s_slot(client, tenant, monkeypatch):
    tenant(concurrency_limit=1)
    decode = generation.decode_source_image
    failures = [InvalidImageError("The JPEG image could not be decoded.", param="image")]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop()
        return decode(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_source_image", flaky)
    body = {"image": data_url(64, 48, "JPEG"), "prompt": "a tram"}
    assert_error(client.post("/v1/image-to-image", json=body, headers=HEADERS), 400, "invalid_image")
    assert client.post("/v1/image-to-image", json=body, headers=HEADERS).status_code == 200  # not 429


# ------------------------------------------------------------------ decode once


def test_finding1_an_asynchronous_job_s_source_is_decoded_once(client, backend, decodes):
    body = {"image": data_url(64, 48, "JPEG"), "prompt": "a lighthouse"}
    response = client.post("/v1/image-to-image", json=body, headers={**AUTH, "Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    client.portal.call(client.app.state.jobs.drain)
    job = client.get(f"/v1/image-to-image/{response.json()['id']}", headers=AUTH).json()
    assert job["status"] == "completed", job
    assert len(decodes) == 1  # before the fix: 2 (the coordinator decoded the stored copy again)
    assert decodes == ["ingress"]
    assert backend.last.image.size == (64, 48)


def test_finding1_a_resumed_job_decodes_its_stored_source_under_the_same_limits(app, client, decodes):
    """Without the ingress's image (a coordinator restarted), the stored bytes are decoded, once."""
    service = app.state.service

    async def restored():
        prepared = await service.store_source(await service.prepare(rest_call(data_url(64, 48))))
        return await service.restore(prepared.call, prepared.source_key)

    prepared = client.portal.call(restored)
    assert decodes == ["ingress", "stored"]
    assert prepared.source.size == (64, 48) and prepared.source_bytes


def test_finding1_a_stored_scan_bomb_is_refused_on_restore_too(app, client):
    async def restore():
        job = rest_call("data:stored")
        key = object_key(TENANT, job.id, "source", "jpg", now=job.created_at)
        await app.state.service.store.put(key, SCAN_BOMB, "image/jpeg")
        await app.state.service.restore(job, key)

    with pytest.raises(InvalidImageError, match="scan"):
        client.portal.call(restore)


def test_finding1_pillow_decodes_what_the_walk_accepts():
    """The walk and Pillow agree on the catalogue's progressive JPEG (no false refusals)."""
    data = encode(noise(40, 32), "JPEG", progressive=True)
    image = load_source_image(data).image
    assert image.size == (40, 32)
    Image.open(io.BytesIO(data)).load()
