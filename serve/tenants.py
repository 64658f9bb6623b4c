"""Tenants: who may call, with which keys, and within which limits.

Keys are stored only as SHA-256 hashes and compared in constant time. Tenants come from three places,
merged by name (later wins): the Serve config (``args.tenants``), the environment (``IMG2IMG_API_KEYS``
and the local run's ``IMG2IMG_DEV_API_KEY``, with default limits) and the object store
(``_tenants/{name}.json``, written by the admin CLI ``img2img-admin``). Ingress replicas re-read the
store every few seconds, so a rotated or revoked key takes effect without a redeploy.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.auth import AuthError, hash_key
from serve.storage import ObjectNotFoundError, ObjectStore

TENANTS_PREFIX = "_tenants/"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def new_key(tenant: str) -> str:
    """A fresh API key: the tenant's name as a readable prefix, then 32 random URL-safe characters."""
    return f"sk-{tenant}-{secrets.token_urlsafe(24)}"


class Tenant(BaseModel):
    """One customer. Persisted as JSON (so ``webhook_secret`` stays a plain string), yet never printed:
    the secret is left out of ``repr`` and validation errors do not echo inputs (a plain key pasted
    into ``key_hashes`` would otherwise be quoted back into logs)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str
    key_hashes: list[str] = Field(default_factory=list, description="sha256 hex of each valid API key")
    allowed_models: list[str] | None = Field(None, description="None: every configured model")
    max_images_per_request: int = Field(8, ge=1, le=64)
    rate_limit_images_per_minute: float | None = Field(None, gt=0)
    concurrency_limit: int | None = Field(None, ge=1, description="requests in flight at once")
    webhook_secret: str | None = Field(
        None, min_length=16, repr=False, description="signs this tenant's webhooks"
    )
    retention_days: int = Field(30, ge=1, le=3650)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("tenant name must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
        return value

    @field_validator("key_hashes")
    @classmethod
    def _hashes(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not _SHA256.fullmatch(v)]
        if bad:
            raise ValueError(
                "key_hashes must be sha256 hex digests (64 lowercase hex chars); never plain keys"
            )
        return values

    def allows_model(self, model_id: str) -> bool:
        return self.allowed_models is None or model_id in self.allowed_models


class TenantDirectory:
    """Tenants by name and by key hash; swapped atomically when the store is re-read."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._by_name: dict[str, Tenant] = {}
        for tenant in tenants:
            self._by_name[tenant.name] = tenant
        self._owner_by_hash = {h: t.name for t in self._by_name.values() for h in t.key_hashes}

    @classmethod
    def from_plain_keys(cls, keys: Mapping[str, str], base: Iterable[Tenant] = ()) -> TenantDirectory:
        """Add ``{plain key: tenant}`` (environment keys) to ``base``; unknown tenants get default limits."""
        tenants = {t.name: t.model_copy(deep=True) for t in base}
        for key, name in keys.items():
            tenant = tenants.setdefault(name, Tenant(name=name))
            tenant.key_hashes.append(hash_key(key))
        return cls(tenants.values())

    def merged(self, tenants: Iterable[Tenant]) -> TenantDirectory:
        return TenantDirectory([*self._by_name.values(), *tenants])

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` header, or AuthError (401)."""
        if not (authorization or "").strip():
            raise AuthError(
                "missing API key: send the header 'Authorization: Bearer <key>'", param="Authorization"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError(
                "malformed Authorization header: expected 'Authorization: Bearer <key>'",
                param="Authorization",
            )
        candidate, owner = hash_key(key.strip()), None
        for stored, name in self._owner_by_hash.items():  # no early exit: timing says nothing
            if hmac.compare_digest(stored, candidate):
                owner = name
        if owner is None:
            raise AuthError("invalid API key", param="Authorization")
        return self._by_name[owner]

    def tenant_for(self, authorization: str | None) -> str:
        return self.authenticate(authorization).name


class TenantStore:
    """Tenants persisted in the object store (what the admin CLI edits)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def load_all(self) -> list[Tenant]:
        tenants = []
        for key in await self.store.list(TENANTS_PREFIX):
            if key.endswith(".json"):
                tenants.append(Tenant.model_validate_json(await self.store.get(key)))
        return tenants

    async def get(self, name: str) -> Tenant | None:
        try:
            return Tenant.model_validate_json(await self.store.get(f"{TENANTS_PREFIX}{name}.json"))
        except ObjectNotFoundError:
            return None

    async def save(self, tenant: Tenant) -> None:
        data = json.dumps(tenant.model_dump(), indent=2).encode()
        await self.store.put(f"{TENANTS_PREFIX}{tenant.name}.json", data, "application/json")


class TenantCatalog:
    """The live tenant directory of one process: configured tenants plus those in the store.

    ``refresh`` re-reads the store (the ingress and coordinator call it from their periodic health
    check), so keys issued, rotated or revoked with the admin CLI apply within seconds.
    """

    def __init__(self, configured: TenantDirectory, store: TenantStore | None) -> None:
        self._configured = configured
        self._store = store
        self.directory = configured

    async def refresh(self) -> None:
        if self._store is not None:
            self.directory = self._configured.merged(await self._store.load_all())

    def lookup(self, name: str) -> Tenant | None:
        return self.directory.get(name)

    def tenant_for(self, authorization: str | None) -> str:
        return self.directory.tenant_for(authorization)
