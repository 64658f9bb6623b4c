"""Object keys, job ids and the local-folder store (no network)."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from serve.errors import StorageUnavailableError
from serve.storage.objects import (
    LocalObjectStore,
    ObjectNotFoundError,
    content_type_for,
    new_job_id,
    object_key,
)

SECRET = b"0123456789abcdef-test-secret"


@pytest.fixture
def store(tmp_path):
    return LocalObjectStore(tmp_path / "objects", "http://127.0.0.1:8000/", SECRET)


def parse_url(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return unquote(parts.path.removeprefix("/files/")), query["expires"][0], query["signature"][0]


def test_object_key_layout_is_tenant_then_utc_date():
    # 23:30 at UTC-5 is already the next day in UTC.
    now = datetime(2024, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert object_key("acme", "img_abc", 0, "png", now=now) == "acme/2025/01/01/img_abc/0.png"
    assert object_key("t-1_x.y", "img_abc", 3, ".JPEG", now=now).endswith("/img_abc/3.jpeg")
    today = datetime.now(UTC)
    assert object_key("acme", "j", 1, "webp").startswith(f"acme/{today:%Y/%m/%d}/")


@pytest.mark.parametrize(
    ("tenant", "job_id", "index", "ext"),
    [
        ("", "j", 0, "png"),
        ("a/b", "j", 0, "png"),
        ("..", "j", 0, "png"),
        ("a..b", "j", 0, "png"),
        (".", "j", 0, "png"),
        ("t", "../x", 0, "png"),
        ("t", "j\n", 0, "png"),
        ("t", "j k", 0, "png"),
        ("t", "x" * 129, 0, "png"),
        ("t", "j", -1, "png"),
        ("t", "j", True, "png"),
        ("t", "j", 0, "p/g"),
        ("t", "j", 0, ""),
    ],
)
def test_object_key_rejects_unsafe_parts(tenant, job_id, index, ext):
    with pytest.raises(ValueError):
        object_key(tenant, job_id, index, ext)


def test_job_ids_are_unique_and_safe_segments():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"img_[A-Za-z0-9]{22}", job_id) for job_id in ids)
    object_key("t", next(iter(ids)), 0, "png")  # usable as a key segment as is


def test_content_type_for_extension():
    assert content_type_for("a/0.png") == "image/png"
    assert content_type_for("a/0.JPG") == "image/jpeg"
    assert content_type_for("a/0.jpeg") == "image/jpeg"
    assert content_type_for("a/0.webp") == "image/webp"
    assert content_type_for("a/0.bin") == "application/octet-stream"


def test_put_get_list_delete(store):
    async def scenario():
        await store.check()
        await store.put("acme/2025/01/01/j1/0.png", b"png-0", "image/png")
        await store.put("acme/2025/01/01/j1/1.png", b"png-1", "image/png")
        await store.put("acme/2025/01/02/j2/0.png", b"other day", "image/png")
        await store.put("other/2025/01/01/j3/0.png", b"other tenant", "image/png")
        await store.put("acme/2025/01/01/j1/0.png", b"png-0 again", "image/png")  # overwrite
        assert await store.get("acme/2025/01/01/j1/0.png") == b"png-0 again"
        day_one = ["acme/2025/01/01/j1/0.png", "acme/2025/01/01/j1/1.png"]
        assert await store.list("acme/2025/01/01/") == day_one
        assert await store.list("acme/2025/01/0") == [
            "acme/2025/01/01/j1/0.png",
            "acme/2025/01/01/j1/1.png",
            "acme/2025/01/02/j2/0.png",
        ]
        assert len(await store.list("")) == 4
        assert await store.list("nobody/") == []
        await store.delete("acme/2025/01/01/j1/0.png")
        await store.delete("acme/2025/01/01/j1/0.png")  # deleting twice is fine, as in S3
        with pytest.raises(ObjectNotFoundError) as caught:
            await store.get("acme/2025/01/01/j1/0.png")
        assert isinstance(caught.value, KeyError)
        with pytest.raises(ObjectNotFoundError):
            await store.get("acme/2025/01/01")  # a folder is not an object

    asyncio.run(scenario())
    leftovers = [name for _, _, files in os.walk(store.root) for name in files if name.startswith(".tmp-")]
    assert leftovers == []


def test_signed_url_verifies_and_rejects_tampering(store):
    key = "acme/2025/01/01/img_x/0.png"
    url = asyncio.run(store.url(key, expires_s=60))
    assert url.startswith("http://127.0.0.1:8000/files/acme/2025/01/01/img_x/0.png?expires=")
    url_key, expires, signature = parse_url(url)
    assert url_key == key
    assert store.verify(key, expires, signature)
    assert not store.verify("acme/2025/01/01/img_x/1.png", expires, signature)
    assert not store.verify(key, int(expires) + 1, signature)
    assert not store.verify(key, expires, signature[:-1] + ("0" if signature[-1] != "0" else "1"))
    assert not store.verify(key, expires, "")
    assert not store.verify(key, "soon", signature)
    other = LocalObjectStore(store.root, store.base_url, b"another-secret-of-16+bytes")
    assert not other.verify(key, expires, signature)


def test_signed_url_expires(store):
    key = "acme/2025/01/01/img_x/0.png"
    _, expires, signature = parse_url(asyncio.run(store.url(key, expires_s=5)))
    assert store.verify(key, expires, signature, now=int(expires))
    assert not store.verify(key, expires, signature, now=int(expires) + 1)
    with pytest.raises(ValueError):
        asyncio.run(store.url(key, expires_s=0))


@pytest.mark.parametrize(
    "key", ["../escape.png", "a/../../escape.png", "/etc/passwd", "a//b.png", "a/./b.png", "a\\..\\b", ""]
)
def test_keys_escaping_the_root_are_refused(store, key):
    with pytest.raises(ValueError):
        asyncio.run(store.put(key, b"x", "image/png"))
    with pytest.raises(ValueError):
        asyncio.run(store.get(key))
    with pytest.raises(ValueError):
        asyncio.run(store.url(key, 60))


def test_symlink_out_of_the_root_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.mkdir(parents=True)
    (store.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        asyncio.run(store.put("link/x.png", b"x", "image/png"))
    assert list(outside.iterdir()) == []


def test_unwritable_root_is_storage_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a folder")
    store = LocalObjectStore(blocker / "objects", "http://h", SECRET)
    with pytest.raises(StorageUnavailableError) as caught:
        asyncio.run(store.check())
    assert caught.value.code == "storage_unavailable"
    with pytest.raises(StorageUnavailableError):
        asyncio.run(store.put("a/b.png", b"x", "image/png"))


def test_short_secret_is_refused(tmp_path):
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path, "http://h", b"short")
