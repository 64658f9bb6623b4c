"""S3ObjectStore against a real S3 server (SeaweedFS): auth, presigned URLs, expiry, and outages."""

from __future__ import annotations

import asyncio
import io
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
from PIL import Image

from serve.errors import StorageUnavailableError
from serve.storage.objects import (
    ConcurrentWriteError,
    ObjectNotFoundError,
    S3ObjectStore,
    new_job_id,
    object_key,
)
from tests.support.s3server import SeaweedS3Server


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_store(server: SeaweedS3Server, bucket: str, **kwargs) -> S3ObjectStore:
    return S3ObjectStore(
        server.endpoint, server.access_key, server.secret_key, bucket, secure=False, **kwargs
    )


def fetch(url: str) -> tuple[int, bytes, str]:
    """GET without credentials; returns status, body and Content-Type (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_put_presign_download(s3_server):
    store = make_store(s3_server, "outputs")
    key = object_key("acme", new_job_id(), 0, "png")
    data = png_bytes()

    async def scenario():
        await store.ensure_bucket()
        await store.ensure_bucket()  # idempotent
        await asyncio.gather(store.ensure_bucket(), store.ensure_bucket())  # replicas racing
        await store.check()
        await store.put(key, data, "image/png")
        assert await store.get(key) == data
        assert await store.list("acme/") == [key]
        return await store.url(key, expires_s=300)

    url = asyncio.run(scenario())
    assert "X-Amz-Signature=" in url
    status, body, content_type = fetch(url)
    assert (status, body, content_type) == (200, data, "image/png")
    assert fetch(url.split("?")[0])[0] == 403  # the same object without the signature is refused


def test_presigned_url_expires(s3_server):
    store = make_store(s3_server, "expiry")

    async def scenario():
        await store.ensure_bucket()
        await store.put("t/x.png", png_bytes(), "image/png")
        return await store.url("t/x.png", expires_s=1)

    url = asyncio.run(scenario())
    assert fetch(url)[0] == 200
    deadline = time.monotonic() + 10
    status = 200
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        status = fetch(url)[0]
    assert status == 403


def test_missing_key_delete_and_list(s3_server):
    store = make_store(s3_server, "misc")

    async def scenario():
        await store.ensure_bucket()
        with pytest.raises(ObjectNotFoundError):
            await store.get("t/none.png")
        for name in ("t/2025/01/01/a/0.png", "t/2025/01/01/a/1.png", "t/2025/01/02/b/0.png", "u/x.png"):
            await store.put(name, b"x", "image/png")
        assert await store.list("t/2025/01/01/") == ["t/2025/01/01/a/0.png", "t/2025/01/01/a/1.png"]
        assert len(await store.list("t/")) == 3
        await store.delete("t/2025/01/01/a/0.png")
        await store.delete("t/2025/01/01/a/0.png")  # S3 deletes are idempotent
        with pytest.raises(ObjectNotFoundError):
            await store.get("t/2025/01/01/a/0.png")

    asyncio.run(scenario())


def test_check_fails_for_missing_bucket_and_bad_credentials(s3_server):
    with pytest.raises(StorageUnavailableError, match="does not exist"):
        asyncio.run(make_store(s3_server, "never-created").check())
    wrong = S3ObjectStore(s3_server.endpoint, "nobody", "wrong-secret", "outputs", secure=False)
    with pytest.raises(StorageUnavailableError) as caught:
        asyncio.run(wrong.put("t/x.png", b"x", "image/png"))
    assert caught.value.code == "storage_unavailable"


def test_public_endpoint_presigns_for_that_host(s3_server):
    # The public host does not resolve here: presigning must not touch the network.
    store = make_store(s3_server, "outputs", public_endpoint="https://images.example.invalid")
    url = asyncio.run(store.url("acme/0.png", 60))
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "images.example.invalid")
    assert parts.path == "/outputs/acme/0.png"
    plain = make_store(s3_server, "outputs", public_endpoint="s3.example.invalid:9000")
    assert asyncio.run(plain.url("acme/0.png", 60)).startswith("http://s3.example.invalid:9000/outputs/")


def test_closed_port_is_unavailable_quickly():
    store = S3ObjectStore(f"127.0.0.1:{closed_port()}", "k", "s", "outputs", secure=False)
    began = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="unreachable"):
        asyncio.run(store.check())
    with pytest.raises(StorageUnavailableError):
        asyncio.run(store.put("t/x.png", b"x", "image/png"))
    assert time.monotonic() - began < 5


def test_outage_and_recovery():
    # A private server: stopping the session one would break tests running after this one.
    with SeaweedS3Server() as server:
        store = make_store(server, "outage")
        asyncio.run(store.ensure_bucket())
        asyncio.run(store.put("t/before.png", b"before", "image/png"))

        server.stop()
        began = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            asyncio.run(store.check())
        with pytest.raises(StorageUnavailableError):
            asyncio.run(store.put("t/during.png", b"during", "image/png"))
        assert time.monotonic() - began < 5

        server.start()
        asyncio.run(store.check())
        asyncio.run(store.put("t/after.png", b"after", "image/png"))
        assert asyncio.run(store.get("t/before.png")) == b"before"  # data survived the restart
        assert asyncio.run(store.list("t/")) == ["t/after.png", "t/before.png"]


def test_silent_server_times_out_as_unavailable():
    # A socket that listens but never answers: the kernel accepts the connection, the read times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = S3ObjectStore(
            f"127.0.0.1:{silent.getsockname()[1]}", "k", "s", "outputs", secure=False, read_timeout_s=0.3
        )
        began = time.monotonic()
        with pytest.raises(StorageUnavailableError, match="Timeout"):
            asyncio.run(store.check())
        assert time.monotonic() - began < 5  # 3 attempts x 0.3 s plus backoff


def test_conditional_puts_refuse_stale_versions_and_second_creates(s3_server):
    """Issue 13, finding 10: the tenant records' concurrency control relies on S3 conditional writes
    (``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace), sent through the SDK's
    ``_put_object``; this pins both the server's support and the SDK's private call."""
    store = make_store(s3_server, "conditional")

    async def scenario():
        await store.ensure_bucket()
        first = await store.put_if("_tenants/x.json", b"1", "application/json", version=None)
        with pytest.raises(ConcurrentWriteError):
            await store.put_if("_tenants/x.json", b"2", "application/json", version=None)
        data, version = await store.get_versioned("_tenants/x.json")
        assert (data, version) == (b"1", first)
        second = await store.put_if("_tenants/x.json", b"3", "application/json", version=version)
        with pytest.raises(ConcurrentWriteError):
            await store.put_if("_tenants/x.json", b"4", "application/json", version=version)
        assert await store.get_versioned("_tenants/x.json") == (b"3", second)

    asyncio.run(scenario())


def test_a_concurrent_revocation_is_not_lost_on_s3(s3_server):
    """Two admins (two stores, two threads) change one tenant from the same version: both land."""
    from serve.tenancy.tenants import TenantStore
    from tests.unit.test_security_tenancy import NEW, concurrent_revocation_survives

    stores = [make_store(s3_server, "tenant-records") for _ in range(2)]
    asyncio.run(stores[0].ensure_bucket())
    assert concurrent_revocation_survives([TenantStore(store) for store in stores]) == [NEW]
