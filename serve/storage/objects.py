"""Where generated images go: an S3 bucket in production, a local folder for a single-machine run.

Both stores speak the same small async ``ObjectStore`` protocol, hand out expiring URLs a client can
fetch without credentials, and turn every backend failure into ``StorageUnavailableError`` so the API
answers 503 (our fault, retry later) instead of leaking SDK exceptions.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import io
import os
import re
import secrets
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from serve.errors import StorageUnavailableError

MAX_URL_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than a week
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
_JOB_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


class ConcurrentWriteError(Exception):
    """A conditional write lost: the object changed (or appeared) since it was read. Read it again."""


class ObjectNotFoundError(KeyError):
    """No object under this key. A ``KeyError`` so callers can treat a store like a mapping."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError would print the repr of the key
        return f"no object under key {self.key!r}"


def object_key(
    tenant: str, job_id: str, index: int | str, extension: str, now: datetime | None = None
) -> str:
    """``{tenant}/{yyyy}/{mm}/{dd}/{job_id}/{index}.{ext}``, dated in UTC.

    The tenant comes first so one prefix holds everything a tenant owns (listing, deletion, quotas); the
    date comes next so retention can drop whole days by prefix.
    """
    for name, value in (("tenant", tenant), ("job_id", job_id)):
        if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or ".." in value or value == ".":
            raise ValueError(f"{name} must be 1-128 of [A-Za-z0-9._-] without '..', got {value!r}")
    if isinstance(index, str):  # a named object of the job, e.g. its stored source image
        if not _SEGMENT.fullmatch(index) or "." in index:
            raise ValueError(f"object name must be 1-128 of [A-Za-z0-9_-], got {index!r}")
    elif isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int or a name, got {index!r}")
    ext = extension.lower().lstrip(".")
    if not _EXTENSION.fullmatch(ext):
        raise ValueError(f"extension must be 1-8 letters or digits, got {extension!r}")
    day = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{tenant}/{day:%Y}/{day:%m}/{day:%d}/{job_id}/{index}.{ext}"


JOB_TIME_CHARS = 9  # base62 milliseconds since the epoch: 62**9 ms is ~400,000 years


def new_job_id(now_ms: int | None = None) -> str:
    """``img_`` + 9 base62 characters of creation time (milliseconds) + 13 random ones (~77 bits).

    Time-ordered (ULID-style): ids sort by creation, so a store's prefix listing pages a tenant's
    jobs in order (the base62 alphabet is in ASCII order); still unguessable, so an id can act as a
    capability; free of ``-``/``_``, so one word to select, a safe path segment and a valid object-key
    part without escaping."""
    moment = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    stamp = ""
    for _ in range(JOB_TIME_CHARS):
        moment, digit = divmod(moment, len(_JOB_ALPHABET))
        stamp = _JOB_ALPHABET[digit] + stamp
    return "img_" + stamp + "".join(secrets.choice(_JOB_ALPHABET) for _ in range(13))


def job_id_time(job_id: str) -> datetime | None:
    """When a time-ordered job id was made (``new_job_id``); None for an id that is not one."""
    stamp = job_id.removeprefix("img_")[:JOB_TIME_CHARS]
    if not job_id.startswith("img_") or len(stamp) < JOB_TIME_CHARS or not set(stamp) <= set(_JOB_ALPHABET):
        return None
    millis = 0
    for char in stamp:
        millis = millis * len(_JOB_ALPHABET) + _JOB_ALPHABET.index(char)
    try:
        return datetime.fromtimestamp(millis / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return None


def content_type_for(key: str) -> str:
    """The media type to serve an object with, from its extension."""
    return _CONTENT_TYPES.get(key.rpartition(".")[2].lower(), "application/octet-stream")


def _check_expiry(expires_s: int) -> None:
    if not 1 <= expires_s <= MAX_URL_EXPIRY_S:
        raise ValueError(f"expires_s must be in [1, {MAX_URL_EXPIRY_S}], got {expires_s}")


class ObjectStore(Protocol):
    """What the service needs from storage. Every method raises ``StorageUnavailableError`` when the
    backend is down; ``get`` raises ``ObjectNotFoundError`` for a missing key."""

    async def put(self, key: str, data: bytes, content_type: str) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def url(self, key: str, expires_s: int) -> str:
        """A URL a client can GET without credentials until ``expires_s`` seconds from now."""
        ...

    async def check(self) -> None:
        """Readiness: return if the store is usable, else raise ``StorageUnavailableError``."""
        ...

    async def delete(self, key: str) -> None:
        """Remove an object; a missing key is not an error (S3 semantics)."""
        ...

    async def list(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (a string prefix, as in S3), sorted."""
        ...

    # Conditional writes (optimistic concurrency), for records edited by more than one writer.

    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and its version (an ETag); ``ObjectNotFoundError`` if missing."""
        ...

    async def put_if(self, key: str, data: bytes, content_type: str, *, version: str | None) -> str:
        """Write only if the object is still at ``version`` (``None``: only if it does not exist yet);
        else raise ``ConcurrentWriteError``. Returns the new version."""
        ...


class S3ObjectStore:
    """An S3 bucket through the ``minio`` SDK. The SDK blocks, so each call runs in a worker thread.

    Timeouts and retries are short on purpose: a dead S3 must fail a request within seconds (503),
    not hold it for minutes while urllib3's defaults retry.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = True,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=urllib3.Retry(total=2, backoff_factor=0.2),
        )
        # An explicit region also stops the SDK from asking S3 for the bucket's location.
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        # SigV4 signs the Host header, so a URL for clients who reach S3 under another name (an ingress
        # host in k8s) must be signed for that name. Presigning is local computation: never connects.
        self._presigner = self._client
        if public_endpoint:
            parts = urlsplit(public_endpoint if "://" in public_endpoint else f"//{public_endpoint}")
            public_secure = secure if not parts.scheme else parts.scheme == "https"
            self._presigner = Minio(
                parts.netloc,
                access_key=access_key,
                secret_key=secret_key,
                secure=public_secure,
                region=region,
            )

    async def _call(self, action: str, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except S3Error as error:
            raise StorageUnavailableError(
                f"S3 refused to {action}", details=f"{error.code}: {error.message} (bucket {self.bucket!r})"
            ) from error
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise StorageUnavailableError(
                f"S3 at {self.endpoint} is unreachable ({action})", details=f"{type(error).__name__}: {error}"
            ) from error

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists. Safe when replicas race: losing the race is success."""

        def ensure() -> None:
            if self._client.bucket_exists(bucket_name=self.bucket):
                return
            try:
                self._client.make_bucket(bucket_name=self.bucket)
            except S3Error:
                # Another replica won the race (BucketAlreadyOwnedByYou) if we can see the bucket now;
                # otherwise the name is taken by someone else (BucketAlreadyExists) or we lack rights.
                if not self._client.bucket_exists(bucket_name=self.bucket):
                    raise

        await self._call("create the bucket", ensure)

    async def expire_prefixes(self, days_by_prefix: dict[str, int]) -> None:
        """S3 lifecycle rules: objects under each prefix expire after its days, enforced by the server
        where it enforces lifecycle (AWS S3, MinIO) in addition to the retention sweeper. The whole
        configuration is replaced, so tenants removed since lose their rule."""
        rules = [
            Rule(
                ENABLED,
                rule_filter=Filter(prefix=prefix),
                rule_id=f"retention-{prefix.strip('/')}"[:255],
                expiration=Expiration(days=days),
            )
            for prefix, days in sorted(days_by_prefix.items())
        ]
        await self._call(
            "set lifecycle rules", self._client.set_bucket_lifecycle, self.bucket, LifecycleConfig(rules)
        )

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        def put() -> None:
            self._client.put_object(
                bucket_name=self.bucket,
                object_name=key,
                data=io.BytesIO(data),  # shares the buffer, no copy
                length=len(data),
                content_type=content_type,
            )

        await self._call("store an object", put)

    async def get(self, key: str) -> bytes:
        return (await self.get_versioned(key))[0]

    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        def get() -> tuple[bytes, str]:
            try:
                response = self._client.get_object(bucket_name=self.bucket, object_name=key)
            except S3Error as error:
                if error.code == "NoSuchKey":
                    raise ObjectNotFoundError(key) from None
                raise
            try:
                return response.read(), response.headers.get("ETag", "").strip('"')
            finally:
                response.close()
                response.release_conn()

        return await self._call("read an object", get)

    async def put_if(self, key: str, data: bytes, content_type: str, *, version: str | None) -> str:
        """S3 conditional PutObject: ``If-Match: <etag>``, or ``If-None-Match: *`` to create. AWS S3,
        MinIO and SeaweedFS answer 412 PreconditionFailed (409 ConditionalRequestConflict on a race
        with another conditional write) when the condition fails. The SDK's ``put_object`` passes no
        conditional headers, so this uses its single-request ``_put_object`` (pinned by an integration
        test against SeaweedFS)."""
        condition = {"If-None-Match": "*"} if version is None else {"If-Match": f'"{version}"'}

        def put() -> str:
            try:
                result = self._client._put_object(
                    self.bucket, key, data, {"Content-Type": content_type, **condition}
                )
            except S3Error as error:
                status = error.response.status if error.response is not None else None
                if error.code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    raise ConcurrentWriteError(f"{key} changed since it was read") from None
                raise
            return result.etag

        return await self._call("store an object", put)

    async def url(self, key: str, expires_s: int) -> str:
        _check_expiry(expires_s)
        return self._presigner.presigned_get_object(
            bucket_name=self.bucket, object_name=key, expires=timedelta(seconds=expires_s)
        )

    async def check(self) -> None:
        def check() -> None:
            if not self._client.bucket_exists(bucket_name=self.bucket):
                raise StorageUnavailableError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}")

        await self._call("check the bucket", check)

    async def delete(self, key: str) -> None:
        await self._call(
            "delete an object", self._client.remove_object, bucket_name=self.bucket, object_name=key
        )

    async def list(self, prefix: str) -> list[str]:
        def list_keys() -> list[str]:
            objects = self._client.list_objects(bucket_name=self.bucket, prefix=prefix, recursive=True)
            return sorted(obj.object_name for obj in objects)

        return await self._call("list objects", list_keys)


class LocalObjectStore:
    """Objects as files under ``root``: the zero-dependency default for a one-machine run.

    URLs point at the ingress (``{base_url}/files/{key}``) and carry an HMAC over key and expiry, so the
    ingress can serve them without credentials, like an S3 presigned URL: ``verify`` first, then ``get``.
    """

    def __init__(self, root: str | os.PathLike, base_url: str, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret must be at least 16 bytes")
        self.root = Path(root).resolve()
        self.base_url = base_url.rstrip("/")
        self._secret = secret

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object key {key!r}")
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):  # e.g. a symlink pointing out of the root
            raise ValueError(f"object key {key!r} escapes the storage root")
        return path

    async def _call(self, action: str, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as error:
            raise StorageUnavailableError(
                f"local storage failed to {action}", details=f"{type(error).__name__}: {error}"
            ) from error

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        # Write beside the target, then rename: readers never see a half-written image.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        await self._call("store an object", self._write, path, data)

    async def get(self, key: str) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise ObjectNotFoundError(key) from None

        return await self._call("read an object", read)

    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = await self.get(key)
        return data, hashlib.sha256(data).hexdigest()

    async def put_if(self, key: str, data: bytes, content_type: str, *, version: str | None) -> str:
        """Compare-and-swap under an exclusive ``flock`` on one lock file in the root (held by threads
        and processes alike, e.g. two admin CLIs); the version is the content's SHA-256."""
        path = self._path(key)
        lock_path = self.root / ".tmp-conditional-writes.lock"  # ``.tmp-`` names are never listed

        def swap() -> str:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    try:
                        current = hashlib.sha256(path.read_bytes()).hexdigest()
                    except (FileNotFoundError, NotADirectoryError):
                        current = None
                    if current != version:
                        raise ConcurrentWriteError(f"{key} changed since it was read")
                    self._write(path, data)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            return hashlib.sha256(data).hexdigest()

        return await self._call("store an object", swap)

    async def url(self, key: str, expires_s: int) -> str:
        self._path(key)
        _check_expiry(expires_s)
        expires = int(time.time()) + expires_s
        return f"{self.base_url}/files/{quote(key)}?expires={expires}&signature={self._sign(key, expires)}"

    def verify(self, key: str, expires: int | str, signature: str, now: float | None = None) -> bool:
        """True if ``signature`` is ours for this key and expiry, and the expiry has not passed."""
        try:
            expires = int(expires)
        except (TypeError, ValueError):
            return False
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._sign(key, expires), str(signature))

    def _sign(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    async def check(self) -> None:
        def check() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError(f"{self.root} is not writable")

        await self._call("prepare its root folder", check)

    async def delete(self, key: str) -> None:
        await self._call("delete an object", self._path(key).unlink, True)

    async def list(self, prefix: str) -> list[str]:
        # Walk only the deepest folder the prefix names, then match the rest as a string prefix.
        start = self.root.joinpath(*[p for p in prefix.rpartition("/")[0].split("/") if p])

        def walk() -> list[str]:
            if not start.resolve().is_relative_to(self.root) or not start.is_dir():
                return []
            keys = (
                path.relative_to(self.root).as_posix()
                for path in start.rglob("*")
                if path.is_file() and not path.name.startswith(".tmp-")
            )
            return sorted(key for key in keys if key.startswith(prefix))

        return await self._call("list objects", walk)
